"""`ehrplan train --workers N`: optimizer steps per second with batches collated in the training
process (N = 0) and by N DataLoader worker processes, in one script so that the load of the
machine hits every run alike.

    python benchmarks/train_workers.py [--preset small-lstm] [--patients 2000] [--max-steps 40]
        [--workers 0 2] [--threads 1 2] [--rounds 1] [--out benchmarks/data/train_workers_cpu.txt]

Each row is one `ehrplan train` process (the default synthetic cohort of ``--patients``, made
once and cached), runs interleaved round by round. Printed per row: steps / train seconds (the
sum of the steps' own times: the forward, backward and optimizer step, plus collation with
N = 0, or the wait for a collated batch with N > 0), the process's wall time (start-up, data
loading and the final evaluations included), and the 1-minute load average before the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(args: argparse.Namespace, workers: int, threads: int, tmp: Path) -> dict[str, float]:
    out = tmp / f"w{workers}-t{threads}-{time.monotonic_ns()}"
    cmd = [
        sys.executable, "-m", "ehrplan", "train", "--preset", args.preset, "--patients",
        str(args.patients), "--max-steps", str(args.max_steps), "--workers", str(workers),
        "--threads", str(threads), "--device", "cpu", "--out", str(out), "--json",
    ]  # fmt: skip
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    s = json.loads(proc.stdout)
    return {
        "workers": workers,
        "threads": threads,
        "steps": s["steps"],
        "train_seconds": s["train_seconds"],
        "steps_per_s": s["steps"] / s["train_seconds"],
        "wall_seconds": wall,
        "load_before": load,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small-lstm")
    p.add_argument("--patients", type=int, default=2000)
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="Also write the rows to this file.")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # the cohort and its example cache, made before anything is timed
        run_once(argparse.Namespace(**{**vars(args), "max_steps": 1}), 0, 1, Path(tmp))
        for r in range(args.rounds):
            for threads in args.threads:
                for workers in args.workers:
                    row = {"round": r, **run_once(args, workers, threads, Path(tmp))}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    head = [
        f"# python benchmarks/train_workers.py {' '.join(sys.argv[1:])}",
        f"# {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "# workers threads steps train_s steps_per_s wall_s load_before",
    ]
    lines = [
        f"{r['workers']} {r['threads']} {r['steps']} {r['train_seconds']:.2f} "
        f"{r['steps_per_s']:.3f} {r['wall_seconds']:.1f} {r['load_before']:.2f}"
        for r in rows
    ]
    text = "\n".join(head + lines) + "\n"
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
