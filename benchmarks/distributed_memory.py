"""Per-rank peak memory of DDP and FSDP2 on the CPU (gloo) against `ehrplan.plan.per_gpu` (by hand).

Each strategy runs under ``torchrun --standalone --nproc-per-node W`` (default W = 2); every rank
builds the model (same seed), wraps it as `ehrplan.runtime.distributed.wrap_model` does, runs one
optimizer step (Adam's state is made), then measures the second step's peak of live tensor bytes
with `ehrplan.runtime.distributed.live_bytes_tracker` (a subclass of
`ehrplan.runtime.measure.LiveTensorBytes`).
One row per strategy: the largest per-rank peak, the estimate for the same per-rank micro-batch
and the error (estimate - measured) / measured.

Why a subclass: FSDP2 frees an all-gathered parameter by ``untyped_storage().resize_(0)`` and
re-allocates it by resizing, outside the dispatcher, and copies all-gathered data into it with an
``out=`` op. The subclass also charges op *inputs* and re-reads the size of every tracked storage
after each op, so those frees and re-allocations are seen.

    python benchmarks/distributed_memory.py                      # tiny-lstm, W=2, DDP and FSDP
    python benchmarks/distributed_memory.py --preset tiny-transformer
    python benchmarks/distributed_memory.py --set vocab_size=20000 --set code_embed_dim=64
    python benchmarks/distributed_memory.py --time               # also: time estimate vs a CPU run

``--time`` runs the single-process step of the same config a few times, measures this CPU's dense
fp32 matmul throughput, and prints the estimated seconds per step
(`ehrplan.plan.per_gpu.estimate_time` at that throughput and the default utilisation) beside the
measured ones, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# the worker (one rank under torchrun)


def _worker(args: argparse.Namespace) -> None:
    import gc

    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from ehrplan.plan.per_gpu import split_batch
    from ehrplan.runtime.batch import synthetic_batch
    from ehrplan.runtime.distributed import (
        DistEnv,
        init_process_group,
        live_bytes_tracker,
        wrap_model,
    )
    from ehrplan.runtime.models import build_model
    from ehrplan.runtime.training.loss import ProgressionLoss

    torch.set_num_threads(1)
    env = DistEnv.from_environ()
    init_process_group(env, "cpu")
    cfg = _config(args)
    micro, accum = split_batch(cfg.effective_batch_size, cfg.batch_size, env.world_size)
    n = min(accum, 2)  # as ehrplan.runtime.measure: later micro-batches repeat the second one
    torch.manual_seed(0)
    model = wrap_model(build_model(cfg), args.strategy, env, "cpu")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = ProgressionLoss()
    batch = synthetic_batch(cfg, micro, seed=env.rank)

    def step() -> None:
        # DDP keeps param.grad as views into its buckets (set_to_none=False), as the trainer does
        opt.zero_grad(set_to_none=args.strategy == "fsdp")
        for i in range(n):
            sync = i == n - 1
            ctx = model.no_sync() if args.strategy == "ddp" and not sync else _null()
            with ctx:
                stage_logits, time_pred = model(*batch.model_inputs())
                loss = loss_fn(stage_logits, time_pred, batch).total / n
                loss.backward()
            del loss, stage_logits, time_pred
        opt.step()

    step()
    gc.collect()

    def local(t: Any) -> Any:
        return t._local_tensor if isinstance(t, DTensor) else t

    tracker: Any = live_bytes_tracker()
    tracker.track(
        [local(p) for p in model.parameters()],
        [local(p.grad) for p in model.parameters() if p.grad is not None],
        [[local(v) for v in s.values()] for s in opt.state.values()],
        [batch.codes, batch.code_mask, batch.time_features],
        [batch.stage, batch.time_to_event, batch.event_observed],
    )
    t0 = time.perf_counter()
    with tracker:
        step()
    seconds = time.perf_counter() - t0
    out = {
        "rank": env.rank,
        "strategy": args.strategy,
        "world_size": env.world_size,
        "micro_batch": micro,
        "micro_batches_measured": n,
        "measured_peak_bytes": int(tracker.peak),
        "seconds": seconds,
    }
    Path(args.out, f"rank{env.rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# the driver


def _config(args: argparse.Namespace) -> Any:
    from ehrplan.plan.config import parse_override, resolve_config

    overrides = dict(parse_override(s) for s in args.set or [])
    return resolve_config(preset=args.preset, overrides=overrides)[0]


def _run_strategy(args: argparse.Namespace, strategy: str) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={args.world}", str(Path(__file__).resolve()), "--worker",
            "--strategy", strategy, "--preset", args.preset, "--out", out,
            *[x for s in args.set or [] for x in ("--set", s)],
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            sys.exit(f"{strategy} failed:\n{proc.stderr[-3000:]}")
        return [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]


def _cpu_tflops() -> float:
    """This CPU's dense fp32 matmul throughput with the threads torch uses (best of 5)."""
    import torch

    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n**3 / best / 1e12


def _time_check(args: argparse.Namespace) -> None:
    import torch

    from ehrplan.plan.per_gpu import DEFAULT_UTILISATION, estimate_time
    from ehrplan.runtime.batch import synthetic_batch
    from ehrplan.runtime.measure import make_step
    from ehrplan.runtime.models import build_model

    cfg = _config(args)
    torch.set_num_threads(1)
    tflops = _cpu_tflops()
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = synthetic_batch(cfg, cfg.batch_size)  # full padding, as the FLOP count assumes
    step = make_step(model, opt, batch, device="cpu", precision="fp32")
    step(cfg.gradient_accumulation_steps)  # warm-up; Adam's state is made
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        step(cfg.gradient_accumulation_steps)
        times.append(time.perf_counter() - t0)
    measured = sorted(times)[len(times) // 2]
    est = estimate_time(cfg, peak_tflops=tflops, utilisation=DEFAULT_UTILISATION)
    ratio = measured / est.seconds_per_step
    reached = est.flops_per_step_per_device / measured / (tflops * 1e12)
    print(
        f"\ntime, one process, 1 thread, full padding: this CPU's fp32 matmul peak "
        f"{tflops * 1e3:.1f} GFLOPS (1024^3 matmul, best of 5); FLOPs per optimizer step "
        f"{est.flops_per_step_per_device:,}"
    )
    print(
        f"estimated {est.seconds_per_step:.4f} s/step (utilisation {DEFAULT_UTILISATION}); "
        f"measured {measured:.4f} s/step (median of 5); measured / estimated {ratio:.2f}; "
        f"utilisation reached {reached:.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="ddp", choices=("ddp", "fsdp"))
    ap.add_argument("--out", default="")
    ap.add_argument("--preset", default="tiny-lstm")
    ap.add_argument("--set", action="append", help="KEY=VALUE config override (repeatable)")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--time", action="store_true", help="also check the time estimate")
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return

    from ehrplan.plan.per_gpu import estimate_parallel

    cfg = _config(args)
    label = args.preset + "".join(f" {s}" for s in args.set or [])
    print(f"# {label}: per-rank peak of the second training step, world size {args.world}, gloo")
    print(
        f"{'strategy':8} {'micro':>5} {'measured (max rank)':>20} {'estimated':>12} "
        f"{'error':>7}  peak moment"
    )
    for strategy in ("ddp", "fsdp"):
        rows = _run_strategy(args, strategy)
        measured = max(r["measured_peak_bytes"] for r in rows)
        est = estimate_parallel(
            cfg, world_size=args.world, strategy=strategy, device="cpu", backend="gloo"
        )
        err = (est.per_device_bytes - measured) / measured
        ranks = ", ".join(f"{r['measured_peak_bytes']:,}" for r in rows)
        print(
            f"{strategy:8} {rows[0]['micro_batch']:>5} {measured:>20,} "
            f"{est.per_device_bytes:>12,} {err:>+7.1%}  {est.peak_moment}"
            f"  (ranks: {ranks})"
        )
    if args.time:
        _time_check(args)


if __name__ == "__main__":
    main()
