"""Wall time of `ehrplan estimate --json` against `python -c "import torch"`, in the same run.

    python benchmarks/estimate_speed.py [--repeats 15] [--args estimate --json]

Runs the two commands alternately, each in a fresh process (the `ehrplan` console script next to
this interpreter, and this interpreter with ``-c "import torch"``), ``--repeats`` times each after
one untimed warm-up of both (so both read from a warm page cache), times each with
``time.perf_counter`` around ``subprocess.run``, and prints every pair, the medians and the ratio
of the medians. Alternating keeps the machine's load alike for both; the ratio is the figure,
the absolute times move with the load. Issue 16 asks for a ratio of at most 0.1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from statistics import median


def _wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=15, help="Timed runs of each command.")
    ap.add_argument(
        "--args",
        nargs="+",
        default=["estimate", "--json"],
        help="The ehrplan arguments to time (default: estimate --json).",
    )
    args = ap.parse_args()
    ehrplan = [str(Path(sys.executable).with_name("ehrplan")), *args.args]
    torch = [sys.executable, "-c", "import torch"]
    print(f"# python benchmarks/estimate_speed.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"# A: {' '.join(['ehrplan', *args.args])}")
    print('# B: python -c "import torch"')
    _wall(ehrplan), _wall(torch)  # warm-up, untimed
    a_times, b_times = [], []
    print(f"{'run':>4} {'A (s)':>8} {'B (s)':>8}")
    for i in range(args.repeats):
        a_times.append(_wall(ehrplan))
        b_times.append(_wall(torch))
        print(f"{i + 1:>4} {a_times[-1]:>8.3f} {b_times[-1]:>8.3f}")
    a, b = median(a_times), median(b_times)
    print(f"median A {a:.3f} s, median B {b:.3f} s, ratio A/B {a / b:.3f}")


if __name__ == "__main__":
    main()
