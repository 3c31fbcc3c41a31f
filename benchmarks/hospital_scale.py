"""Issue 13's first "done when", end to end: synth at scale, the example cache, then training.

Runs three commands one after another, each in its own process, and records for each its wall
seconds, CPU seconds and peak RSS (the kernel's ``wait4`` figure for the process and the children
it waited for):

1. ``ehrplan synth --patients N --out D`` (skipped with ``--reuse`` when D exists);
2. ``ehrplan data prepare D --json`` (the example cache; built when absent);
3. ``ehrplan train --preset small-lstm --data D --max-steps S --out RUN``: additionally, the
   seconds from launch until it printed ``training preset ...`` (torch imported, the cache
   opened and the splits built; the model is built and the loop starts next), until step 1's record
   appeared in ``RUN/metrics.jsonl``, and the largest RSS of the process tree sampled every 50
   ms before then.

Step 1's record is written when step 1 has finished, so ``first_step_seconds`` is an upper bound
on "training started" (by one step's time), and ``rss_before_first_step_bytes`` includes step 1's
own memory: both are bounds in the direction that makes a target harder to meet.

    python benchmarks/hospital_scale.py --patients 200000 --work /tmp/hs --out rows.json

The rows are JSON with the commands in them; the figures the README quotes come from such a file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

EHRPLAN = [sys.executable, "-m", "ehrplan"]


def _rss_of_tree(pid: int) -> int:
    """RSS of a process and its children (bytes), 0 when it is gone."""
    try:
        import psutil

        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
        return sum(q.memory_info().rss for q in procs if q.is_running())
    except Exception:  # a process that ended between the calls
        return 0


def run(
    cmd: list[str], env: dict[str, str], watch: Path | None = None, stop: bool = False
) -> dict[str, Any]:
    """Run ``cmd`` (`run_measured` adds its name and exit code); its wall seconds and, with
    ``watch`` (a metrics file): when its stdout said ``training ...`` (the trainer's first line,
    printed as its loop starts), when its first step record appeared, and the largest RSS
    sampled before then. ``stop``: send Ctrl-C once the first step record is there (the run
    stops at a checkpoint, without its final evaluation)."""
    start = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append((time.time() - start, line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    first_step = None
    rss_before_step = 0
    while p.poll() is None:
        if watch is not None and first_step is None:
            if watch.is_file() and '"kind": "step"' in watch.read_text():
                first_step = time.time() - start
                if stop:
                    p.send_signal(signal.SIGINT)
            else:
                rss_before_step = max(rss_before_step, _rss_of_tree(p.pid))
        time.sleep(0.05)
    reader.join()
    err = p.stderr.read() if p.stderr else ""
    started = next((s for s, line in lines if line.startswith("training ")), None)
    return {
        "seconds": round(time.time() - start, 2),
        "training_line_seconds": round(started, 2) if started is not None else None,
        "first_step_seconds": round(first_step, 2) if first_step is not None else None,
        "rss_before_first_step_bytes": rss_before_step or None,
        "stdout_tail": "".join(line for _, line in lines)[-1500:],
        "stderr_tail": err[-1500:],
    }


def run_measured(
    cmd: list[str], env: dict[str, str], watch: Path | None = None, stop: bool = False
) -> dict[str, Any]:
    """`run`, plus the kernel's peak RSS and CPU seconds of the command (a wrapper process reads
    them from its own ``RUSAGE_CHILDREN``, so that samples taken here do not race the reaping;
    it passes a Ctrl-C on to the command)."""
    wrapper = [
        sys.executable,
        "-c",
        "import resource,subprocess,sys,json,signal;"
        "p=subprocess.Popen(sys.argv[1:]);"
        "signal.signal(signal.SIGINT,lambda s,f:p.send_signal(signal.SIGINT));"
        "rc=p.wait();"
        "u=resource.getrusage(resource.RUSAGE_CHILDREN);"
        "print(json.dumps({'rc':rc,'maxrss':u.ru_maxrss*1024,'cpu':u.ru_utime+u.ru_stime}),"
        "file=sys.stderr)",
        *cmd,
    ]
    row = run(wrapper, env, watch, stop)
    last = row["stderr_tail"].strip().splitlines()[-1]
    usage = json.loads(last)
    row.update(
        command=" ".join(cmd[2:] if cmd[:2] == EHRPLAN[:2] else cmd),
        rc=usage["rc"],
        peak_rss_bytes=usage["maxrss"],
        cpu_seconds=round(usage["cpu"], 2),
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=int, default=200_000)
    ap.add_argument("--work", type=Path, required=True, help="Folder for the data, cache, run.")
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--reuse", action="store_true", help="Keep an existing data set and cache.")
    ap.add_argument(
        "--until-first-step",
        action="store_true",
        help="Ctrl-C the training run once its first step is recorded (skips the final "
        "evaluation of the tuning and held-out splits, minutes on the CPU at 200,000 patients).",
    )
    ap.add_argument("--out", type=Path, help="Write the rows here as JSON (else stdout).")
    a = ap.parse_args()
    data = a.work / f"synth-{a.patients}"
    run_dir = a.work / "run"
    env = dict(os.environ, EHRPLAN_CACHE=str(a.work / "cache"))
    if not a.reuse:
        shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    rows: dict[str, Any] = {}
    if not data.exists():
        rows["synth"] = run_measured(
            [*EHRPLAN, "synth", "--patients", str(a.patients), "--out", str(data), "--json"], env
        )
    rows["prepare"] = run_measured([*EHRPLAN, "data", "prepare", str(data), "--json"], env)
    train = [
        *EHRPLAN, "train", "--preset", "small-lstm", "--data", str(data),
        "--max-steps", str(a.max_steps), "--out", str(run_dir),
    ]  # fmt: skip
    rows["train"] = run_measured(
        train, env, watch=run_dir / "metrics.jsonl", stop=a.until_first_step
    )
    doc = {
        "what": "benchmarks/hospital_scale.py",
        "argv": sys.argv[1:],
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_at_start": os.getloadavg(),
        "cpus": os.cpu_count(),
        "rows": rows,
    }
    text = json.dumps(doc, indent=2)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
