"""Wall time of `ehrplan estimate --json` against `python -c "import torch"`, in the same run.

    python benchmarks/estimate_speed.py [--repeats 15] [--args estimate --json]

Runs the two commands alternately, each in a fresh process (the `ehrplan` console script next to
this interpreter, and this interpreter with ``-c "import torch"``), ``--repeats`` times each after
one untimed warm-up of both (so both read from a warm page cache), times each with
``time.perf_counter`` around ``subprocess.run``, and prints every pair, the medians and the ratio
of the medians, and the same for the CPU time each process used. Alternating keeps the load
alike for both; the ratio is the figure, the absolute times move with the load. Issue 16 asks
for a ratio of at most 0.1.

A third command, C, is the floor under any Typer + Pydantic command here: this interpreter
importing Typer's CLI machinery (which, from Typer 0.2x on, builds a Pydantic ``TypeAdapter`` per
option) and Pydantic, then building one one-field model (Pydantic's first model loads its schema
machinery). Its ratio to B is what no change inside ehrplan can go below.

Both run without ``PYTHONDONTWRITEBYTECODE``, so the warm-up leaves ehrplan's bytecode cached as
`pip install` leaves it (an editable install under that variable would recompile ehrplan's
modules on every run; torch's bytecode was compiled when it was installed).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
FLOOR = (
    "import os\n"
    "os.environ.setdefault('PYDANTIC_DISABLE_PLUGINS', '__all__')\n"
    "import typer.main, pydantic\n"
    "class A(pydantic.BaseModel):\n"
    "    x: int = 1\n"
    "A()\n"
)


def _wall(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds of ``cmd``, and the CPU seconds (user + system) it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=ENV)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


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
    floor = [sys.executable, "-c", FLOOR]
    print(f"# python benchmarks/estimate_speed.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"# A: {' '.join(['ehrplan', *args.args])}")
    print('# B: python -c "import torch"')
    print("# C: python -c <import typer.main and pydantic, build a one-field model> (the floor)")
    print(f"# load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    _wall(ehrplan), _wall(torch), _wall(floor)  # warm-up, untimed
    runs: dict[str, list[tuple[float, float]]] = {"A": [], "B": [], "C": []}
    print(f"{'run':>4}" + "".join(f" {k + ' wall':>8}" for k in runs), end="")
    print("".join(f" {k + ' cpu':>8}" for k in runs) + "  (seconds)")
    for i in range(args.repeats):
        for key, cmd in zip(runs, (ehrplan, torch, floor), strict=True):
            runs[key].append(_wall(cmd))
        row = [runs[k][-1][0] for k in runs] + [runs[k][-1][1] for k in runs]
        print(f"{i + 1:>4}" + "".join(f" {x:>8.3f}" for x in row))
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for j, what in ((1, "CPU time"), (0, "wall time")):
        a, b, c = (median(r[j] for r in runs[k]) for k in runs)
        print(
            f"{what}: median A {a:.3f} s, B {b:.3f} s, C {c:.3f} s; "
            f"ratio A/B {a / b:.3f}, C/B {c / b:.3f}"
        )


if __name__ == "__main__":
    main()
