"""Speed and RSS cost of `ehrplan.runtime.allocator`'s settings (run by hand).

Each case runs ``--steps`` training steps (forward, loss, backward, Adam; with ``--trim``
`allocator.trim` after every step, as the trainer did before it trimmed every 50 steps) in a
fresh process, once with glibc's defaults (``EHRPLAN_MALLOC=default``)
and once with ehrplan's settings, interleaved ``--repeats`` times so that both see the same load.
It prints the median step time of each, their ratio, and the process's peak RSS growth.

    python benchmarks/allocator_settings.py --out benchmarks/data/allocator_settings_cpu.txt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

CASES = {
    "small-transformer b8": ("small-transformer", 8),
    "small-lstm b2": ("small-lstm", 2),
    "tiny-lstm b8": ("tiny-lstm", 8),
}

CHILD = r"""
import json, statistics, sys, time
from ehrplan.runtime import allocator
allocator.configure()
import torch
from ehrplan.plan.config import get_preset
from ehrplan.runtime.batch import synthetic_batch
from ehrplan.runtime.measure import make_step, peak_rss_bytes
from ehrplan.runtime.models import build_model
preset, batch, steps, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
cfg = get_preset(preset).config.model_copy(update={"batch_size": batch})
before = peak_rss_bytes()
model = build_model(cfg).train()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
b = synthetic_batch(cfg, batch, seed=0)
step = make_step(model, opt, b, device="cpu", precision="fp32")
times = []
for _ in range(steps):
    t0 = time.perf_counter(); step(1)
    if every and len(times) % every == 0: allocator.trim()
    times.append(time.perf_counter() - t0)
growth = peak_rss_bytes() - before
print(json.dumps({"seconds": statistics.median(times[1:]), "rss_growth": growth}))
"""


def run(preset: str, batch: int, steps: int, default: bool, trim: bool) -> dict[str, float]:
    env = dict(os.environ)
    if default:
        env["EHRPLAN_MALLOC"] = "default"
    else:
        env.pop("EHRPLAN_MALLOC", None)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, preset, str(batch), str(steps), "1" if trim else "0"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="steps per process (first not timed)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved processes per setting")
    ap.add_argument("--out", type=Path, help="also write the table to this file")
    ap.add_argument("--trim", action="store_true", help="malloc_trim after every step")
    args = ap.parse_args()
    lines = [
        f"# command: python {' '.join(sys.argv)}",
        f"# machine: {platform.machine()}, {os.cpu_count()} CPUs (shared, loaded); one thread",
        f"{'case':<22}{'default s/step':>16}{'ehrplan s/step':>16}{'ratio':>8}"
        f"{'default RSS growth':>20}{'ehrplan RSS growth':>20}",
    ]
    print("\n".join(lines), flush=True)
    for name, (preset, batch) in CASES.items():
        res: dict[bool, list[dict[str, float]]] = {True: [], False: []}
        for _ in range(args.repeats):
            for default in (True, False):
                res[default].append(run(preset, batch, args.steps, default, args.trim))
        d = statistics.median(r["seconds"] for r in res[True])
        e = statistics.median(r["seconds"] for r in res[False])
        rd = max(int(r["rss_growth"]) for r in res[True])
        re_ = max(int(r["rss_growth"]) for r in res[False])
        line = f"{name:<22}{d:>16.4f}{e:>16.4f}{e / d:>7.2f}x{rd:>20,}{re_:>20,}"
        lines.append(line)
        print(line, flush=True)
    if args.out:
        from ehrplan.atomic import write_text

        write_text(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
