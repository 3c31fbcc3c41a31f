"""CPU attention with dropout: fused SDPA (math fallback) vs the model's explicit path (by hand).

On the CPU, ``scaled_dot_product_attention`` with ``dropout_p > 0`` runs its math fallback, which
under bf16 autocast upcasts q, k, v and the attention matrices to fp32. The explicit path keeps
them in the autocast dtype. This measures both paths for one Transformer config in fp32 and bf16:
the measured peak (`ehrplan.runtime.measure.LiveTensorBytes`, second step), the estimate, and the
step time as a ratio to the fused path's in the same run (the machine may be loaded).

    python benchmarks/cpu_attention_path.py --out benchmarks/data/cpu_attention_path.txt
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

from ehrplan.atomic import write_text
from ehrplan.plan.config import validate_config
from ehrplan.plan.estimator import estimate_memory
from ehrplan.runtime.batch import synthetic_batch
from ehrplan.runtime.measure import LiveTensorBytes, make_step
from ehrplan.runtime.models import build_model
from ehrplan.runtime.models.transformer import CausalSelfAttention

CONFIG = dict(
    model_type="transformer", num_layers=2, code_embed_dim=16, visit_embed_dim=32,
    hidden_dim=64, num_heads=4, batch_size=4, max_visits=64, max_codes_per_visit=4,
    dropout=0.1, vocab_size=300, use_flash_attention=True,
)  # fmt: skip


def measure(precision: str, explicit_on_cpu_dropout: bool, repeats: int) -> tuple[int, float]:
    """Peak live bytes of the second step and the median seconds of ``repeats`` steps."""
    cfg = validate_config(CONFIG)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    for m in model.modules():
        if isinstance(m, CausalSelfAttention):
            m.explicit_on_cpu_dropout = explicit_on_cpu_dropout
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = synthetic_batch(cfg, cfg.batch_size, seed=0)
    step = make_step(model, opt, batch, device="cpu", precision=precision)
    step(1)
    opt.zero_grad(set_to_none=True)
    gc.collect()
    tracker = LiveTensorBytes()
    tracker.track(
        list(model.parameters()),
        [list(s.values()) for s in opt.state.values()],
        [getattr(batch, f.name) for f in fields(batch)],
    )
    with tracker:
        step(1)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(1)
        times.append(time.perf_counter() - t0)
    return tracker.peak, sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=20, help="timed steps per case")
    ap.add_argument("--out", type=Path, help="also write the table to this file")
    args = ap.parse_args()
    lines = [
        f"# command: python {' '.join(sys.argv)}",
        f"# machine: {platform.machine()}, torch {torch.__version__}, config {CONFIG}",
        f"{'precision':<10}{'path':<26}{'measured':>12}{'estimate':>12}{'error':>8}{'time':>8}",
    ]
    for precision in ("fp32", "bf16"):
        est = estimate_memory(validate_config(CONFIG), precision=precision).total_bytes
        fused_peak, fused_s = measure(precision, False, args.repeats)
        explicit_peak, explicit_s = measure(precision, True, args.repeats)
        for name, peak, s in (
            ("fused SDPA (math fallback)", fused_peak, fused_s),
            ("explicit", explicit_peak, explicit_s),
        ):
            lines.append(
                f"{precision:<10}{name:<26}{peak:>12,}{est:>12,}{(est - peak) / peak:>+8.1%}"
                f"{s / fused_s:>7.2f}x"
            )
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        write_text(args.out, text)


if __name__ == "__main__":
    main()
