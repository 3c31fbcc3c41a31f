"""Example cache build speed and memory: `ehrplan data prepare` with 1 and 2 worker processes.

Each build runs in a fresh process with an empty ``$EHRPLAN_CACHE`` (so nothing is reused) on
the same MEDS data set; the rows give wall seconds, CPU seconds of the build process and its
workers, events per wall second and per CPU second, the build process's own peak RSS and the
largest peak RSS among its workers (forked workers share the parent's pages, so the two overlap;
their sum is an upper bound). ``--tree`` runs another source tree's ehrplan (e.g. the one before
a change) through ``PYTHONPATH``, for a before/after pair in one run; a tree whose `prepare`
takes no ``workers`` is run once, as it is.

    python benchmarks/cache_build.py DATA --workers 1 2 --repeats 2 --out FILE [--tree DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DRIVER = r"""
import inspect, json, resource, sys, time
from ehrplan.data import cache
root, workers = sys.argv[1], int(sys.argv[2])
kw = {"workers": workers} if "workers" in inspect.signature(cache.prepare).parameters else {}
if hasattr(cache.Settings, "for_request"):
    settings = cache.Settings.for_request(root, optional_task=True)
else:
    settings = cache.Settings()
t = time.perf_counter()
c = cache.prepare(root, settings, **kw)
wall = time.perf_counter() - t
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({
    "workers": workers if kw else None,
    "events": int(c.num_events),
    "wall_s": wall,
    "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
    "peak_rss_self": me.ru_maxrss * 1024,
    "peak_rss_workers": kids.ru_maxrss * 1024,
    "disk_bytes": c.disk_bytes(),
}))
"""


def _one(data: Path, workers: int, tree: Path | None) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="ehrplan-cache-bench-"))
    env = dict(os.environ, EHRPLAN_CACHE=str(home))
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    try:
        out = subprocess.run(
            [sys.executable, "-c", DRIVER, str(data), str(workers)],
            env=env,
            cwd=tree if tree is not None else REPO,  # `python -c` puts the cwd first on sys.path
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        shutil.rmtree(home, ignore_errors=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["events_per_s"] = row["events"] / row["wall_s"]
    row["events_per_cpu_s"] = row["events"] / row["cpu_s"]
    row["tree"] = "this" if tree is None else "other"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="a MEDS data set (e.g. from ehrplan synth)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts")
    ap.add_argument("--repeats", type=int, default=1, help="builds per worker count")
    ap.add_argument("--tree", type=Path, help="also run this source tree's ehrplan (before)")
    ap.add_argument("--out", type=Path, help="write the rows here (JSON, command in header)")
    a = ap.parse_args()
    rows = []
    for _ in range(a.repeats):
        for tree in [None] + ([a.tree] if a.tree else []):
            for w in a.workers if tree is None else a.workers[:1]:
                r = _one(a.data, w, tree)
                print(json.dumps(r), flush=True)
                rows.append(r)
    load = os.getloadavg()[0]
    head = (
        f"# python benchmarks/cache_build.py {' '.join(sys.argv[1:])}\n"
        f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; load average {load:.1f} on "
        f"{os.cpu_count()} CPUs (shared machine)\n"
    )
    if a.out:
        a.out.write_text(head + json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
