"""Same data, same metrics: ``train --auto`` at an older commit beside the working tree.

The example cache (issue 13) changes how examples are stored, not what they are. This runs
``ehrplan train --auto --max-steps S --seed 0 --threads T`` on the built-in 2,000-patient
synthetic cohort twice, in one script: once with the package of ``--ref`` (a commit, checked out
into a temporary git worktree and put first on ``PYTHONPATH``) and once with this checkout's,
each with its own empty ``$EHRPLAN_CACHE`` (so both make the cohort and choose the preset from
nothing). It prints both runs' model config, their last evaluation's tuning and held-out metrics and
whether the per-step training losses agree, and whether each
is equal (exactly, and within a relative 1e-6).

    python benchmarks/same_metrics.py --ref c9fc569 --work /tmp/same --max-steps 200
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _train(src: Path, work: Path, steps: int, threads: int) -> dict[str, Any]:
    run = work / "run"
    env = dict(os.environ, PYTHONPATH=str(src), EHRPLAN_CACHE=str(work / "cache"))
    cmd = [
        sys.executable, "-m", "ehrplan", "train", "--auto", "--max-steps", str(steps),
        "--seed", "0", "--threads", str(threads), "--out", str(run), "--json",
    ]  # fmt: skip
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"{src}: train exited {p.returncode}: {p.stderr.strip()[-800:]}")
    summary = json.loads((run / "summary.json").read_text())
    steps_seen = [
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"kind": "step"' in line
    ]
    return {
        "source": str(src),
        "seconds": round(time.perf_counter() - t0, 1),
        "config": json.loads((run / "config.json").read_text())["config"],
        "test": summary["last"],
        "last_loss": steps_seen[-1]["loss"] if steps_seen else None,
        "losses": [r["loss"] for r in steps_seen],
    }


def _flat(d: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out |= _flat(v, f"{prefix}{k}.")
    elif isinstance(d, int | float) and not isinstance(d, bool):
        out[prefix.rstrip(".")] = float(d)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", required=True, help="The older commit (e.g. before the cache).")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    old_src = a.work / "old-src"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(old_src), a.ref],
        check=True,
        capture_output=True,
    )
    try:
        old = _train(old_src, a.work / "old", a.max_steps, a.threads)
        new = _train(REPO, a.work / "new", a.max_steps, a.threads)
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(old_src)],
            check=False,
            capture_output=True,
        )
    fo, fn = _flat(old["test"]), _flat(new["test"])
    keys = sorted(set(fo) | set(fn))
    rows = []
    for k in keys:
        x, y = fo.get(k), fn.get(k)
        close = x is not None and y is not None and math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)
        rows.append({"metric": k, "old": x, "new": y, "equal": x == y, "close": close})
    doc = {
        "ref": a.ref,
        "max_steps": a.max_steps,
        "threads": a.threads,
        "old": {k: v for k, v in old.items() if k not in ("losses", "test")},
        "new": {k: v for k, v in new.items() if k not in ("losses", "test")},
        "same_config": old["config"] == new["config"],
        "losses_equal": old["losses"] == new["losses"],
        "metrics_equal": all(r["equal"] for r in rows),
        "metrics_close": all(r["close"] for r in rows),
        "metrics": rows,
    }
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
