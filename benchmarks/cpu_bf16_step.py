"""fp32 against bf16 autocast for one training step on this CPU: the evidence behind the planner's
rule "bf16 on CPUs with native bf16" (`ehrplan/plan/target.py`).

Interleaves the two precisions (``--rounds`` passes of ``--steps`` optimizer steps each) on the
same model, batch and thread count, and reports the wall time and the process CPU time per step
(CPU time is less disturbed by other processes on a shared machine). Fully padded batches at the
preset's maxima, micro-batch as ``--batch``.

    python benchmarks/cpu_bf16_step.py --preset small-lstm --batch 32 --no-checkpointing
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from ehrplan.plan.config import get_preset
from ehrplan.plan.hardware import probe
from ehrplan.runtime.batch import synthetic_batch
from ehrplan.runtime.measure import make_step
from ehrplan.runtime.models import build_model


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small-lstm")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset).config.model_copy(
        update={"batch_size": args.batch, "use_checkpoint": args.checkpointing}
    )
    cpu = probe().cpu
    print(f"# {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}; CPU {cpu.model}; native bf16: {cpu.bf16}")
    print(f"# {args.preset}, batch {args.batch} at full padding, {args.threads} thread(s)")
    runs = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_model(cfg).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        batch = synthetic_batch(cfg, args.batch, seed=0, device="cpu")
        step = make_step(model, opt, batch, device="cpu", precision=precision)
        step(1)  # Adam's state, oneDNN primitives
        runs[precision] = step
    totals = {p: [0.0, 0.0] for p in runs}
    print("round  precision  wall s/step  cpu s/step")
    for r in range(args.rounds):
        for precision, step in runs.items():
            w0, c0 = time.perf_counter(), cpu_seconds()
            for _ in range(args.steps):
                step(1)
            wall = (time.perf_counter() - w0) / args.steps
            cpu_s = (cpu_seconds() - c0) / args.steps
            totals[precision][0] += wall
            totals[precision][1] += cpu_s
            print(f"{r:5d}  {precision:9s}  {wall:11.3f}  {cpu_s:10.3f}")
    f, b = totals["fp32"], totals["bf16"]
    print(f"fp32/bf16 time per step: wall {f[0] / b[0]:.2f}x, cpu {f[1] / b[1]:.2f}x")


if __name__ == "__main__":
    main()
