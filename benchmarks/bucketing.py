"""Length-bucketing pool against held-out quality and speed, for what `train --auto` trains.

    python benchmarks/bucketing.py [--pools 1600 200 0] [--seeds 0 1 2] [--max-steps 200]

Runs ``ehrplan train --auto --max-steps N --seed S --bucket-patients P`` for every pool P and seed
S, each in its own process and run folder (under a temporary directory), and prints each run's
held-out stage macro-F1, C-index and patients per second from its ``summary.json``, then the mean
per pool. With small-lstm's 32 x 1 (what ``--auto`` trains on a CPU host), 1,600 patients is the
old pool of 50 batches (the whole train split of the default cohort), 200 the default, 0 random
batches without bucketing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pools", type=int, nargs="+", default=[1600, 200, 0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-steps", type=int, default=200)
    args = ap.parse_args()
    print(f"# python benchmarks/bucketing.py {' '.join(sys.argv[1:])}")
    print(f"{'pool':>6} {'seed':>4} {'macro-F1':>9} {'C-index':>8} {'patients/s':>11}")
    rows: dict[int, list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pool in args.pools:
            for seed in args.seeds:
                out = Path(tmp) / f"pool{pool}-seed{seed}"
                cmd = [
                    sys.executable, "-m", "ehrplan", "train", "--auto", "--max-steps",
                    str(args.max_steps), "--seed", str(seed), "--bucket-patients", str(pool),
                    "--out", str(out),
                ]  # fmt: skip
                subprocess.run(cmd, check=True, capture_output=True)
                s = json.loads((out / "summary.json").read_text())
                held = s["best"]["held_out"]
                row = (held["stage_macro_f1"], held["c_index"], s["patients_per_s"])
                rows.setdefault(pool, []).append(row)
                f1, c, pps = row
                print(f"{pool:>6} {seed:>4} {f1:>9.3f} {c:>8.3f} {pps:>11.1f}", flush=True)
    for pool, rs in rows.items():
        f1, c, pps = (mean(r[i] for r in rs) for i in range(3))
        print(f"{pool:>6} mean {f1:>9.3f} {c:>8.3f} {pps:>11.1f}")


if __name__ == "__main__":
    main()
