"""Data loading at scale: ehrplan's example cache beside the field's PyTorch MEDS dataset package.

On one synthetic MEDS data set (``ehrplan synth``, about ``--events`` events), for each tool:

- preprocessing: wall seconds, events/s and peak RSS of the process that turns MEDS into what the
  loader reads (``ehrplan data prepare``; meds-torch-data's ``MTD_preprocess``);
- the loader alone, in a fresh process: time from process start to the first batch, examples/s
  over ``--batches`` batches with ``--workers`` DataLoader workers, and peak RSS of the process
  (its workers reported apart);
- ehrplan only: data RSS per event touched, from a run without workers (peak RSS minus the RSS
  before the cache was opened, over the events of the batches read).

An example is one patient for ehrplan (all visits, truncated to small-lstm's 50 x 50) and one
subject sequence of at most 2,500 events for meds-torch-data (the same budget of events). Each
measurement runs in its own process; peak RSS is the kernel's (``wait4``) for that process and
the children it waited for.

meds-torch-data is not a dependency of ehrplan: install it into its own environment
(``pip install .[bench]`` there, or ``pip install meds-torch-data``) and pass that interpreter as
``--mtd-python``; without one, its rows say why they are missing.

    python benchmarks/data_loading.py --events 10000000 --work /tmp/dl --mtd-python /path/python
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EVENTS_PER_PATIENT = 190  # `ehrplan synth`: 37,980,350 events for 200,000 patients
MAX_VISITS, MAX_CODES = 50, 50  # small-lstm


def _run(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; wall seconds, peak RSS (bytes, the kernel's wait4) and its stdout."""
    start = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out = p.stdout.read() if p.stdout else b""
    err = p.stderr.read() if p.stderr else b""
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return {
        "start": start,
        "seconds": time.time() - start,
        "peak_rss": usage.ru_maxrss * 1024,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "rc": p.returncode,
        "stdout": out.decode(),
        "stderr": err.decode()[-2000:],
    }


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------------------------
# loader processes (run as: data_loading.py --loader ehrplan|mtd ...)


def _loader_ehrplan(a: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from ehrplan.data.cache import prepare
    from ehrplan.data.dataset import EHRDataset

    before = _rss()
    cache = prepare(a.data)
    ds = EHRDataset(
        cache,
        cache.vocab,
        split="train",
        max_visits=MAX_VISITS,
        max_codes_per_visit=MAX_CODES,
        ids=cache.tokens,
    )
    loader = torch.utils.data.DataLoader(
        ds,
        batch_sampler=ds.batch_sampler(a.batch_size, seed=0),
        collate_fn=ds.collate,
        num_workers=a.workers,
        prefetch_factor=4 if a.workers else None,
        persistent_workers=False,
    )
    return _iterate(loader, a, before, lambda b: int(b.code_mask.sum()), np)


def _loader_mtd(a: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from meds_torchdata import MEDSPytorchDataset, MEDSTorchDataConfig

    before = _rss()
    cfg = MEDSTorchDataConfig(tensorized_cohort_dir=a.data, max_seq_len=MAX_VISITS * MAX_CODES)
    ds = MEDSPytorchDataset(cfg, split="train")
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=a.batch_size,
        shuffle=True,
        collate_fn=ds.collate,
        num_workers=a.workers,
        prefetch_factor=4 if a.workers else None,
    )

    def events(batch: Any) -> int:
        codes = batch.code if hasattr(batch, "code") else batch["code"]
        return int((codes != 0).sum())

    return _iterate(loader, a, before, events, np)


def _cpu() -> float:
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _iterate(loader: Any, a: argparse.Namespace, before: int, events: Any, np: Any) -> dict:
    cpu0 = _cpu()
    it = iter(loader)
    first = next(it)
    t_first = time.time()
    n_examples = 0
    touched = events(first)
    t0 = time.perf_counter()
    for i, batch in enumerate(it):
        n_examples += len(batch.code_mask) if hasattr(batch, "code_mask") else a.batch_size
        touched += events(batch)
        if i + 1 >= a.batches:
            break
    seconds = time.perf_counter() - t0
    del it  # its workers exit and are waited for: their CPU time and peak RSS count below
    import gc
    import resource

    gc.collect()
    return {
        "first_batch_at": t_first,
        "examples_per_second": n_examples / seconds,
        "examples": n_examples,
        "loader_cpu_seconds": _cpu() - cpu0,
        "events_touched": touched,
        "rss_before_data": before,
        "rss_end": _rss(),
        "peak_rss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }


# ---------------------------------------------------------------------------------------------
# the comparison


def _loader_row(
    python: str, kind: str, data: Path, a: argparse.Namespace, workers: int, env: dict[str, str]
) -> dict[str, Any]:
    cmd = [
        python,
        __file__,
        "--loader",
        kind,
        "--data",
        str(data),
        "--workers",
        str(workers),
        "--batch-size",
        str(a.batch_size),
        "--batches",
        str(a.batches),
    ]
    r = _run(cmd, env)
    if r["rc"] != 0:
        return {"error": r["stderr"].strip().splitlines()[-1] if r["stderr"].strip() else "failed"}
    doc = json.loads(r["stdout"].strip().splitlines()[-1])
    doc["time_to_first_batch"] = doc["first_batch_at"] - r["start"]
    doc["peak_rss"] = r["peak_rss"]
    return doc


def _tool_row(
    prep: dict[str, Any], events: int, disk_bytes: int, load: dict[str, Any]
) -> dict[str, Any]:
    """One tool's row: its preprocessing run, its bytes on disk and its loader's figures."""
    loader_keys = (
        "examples_per_second",
        "time_to_first_batch",
        "loader_cpu_seconds",
        "examples",
        "peak_rss",
        "peak_rss_workers",
        "error",
    )
    return {
        "prep_s": prep["seconds"],
        "prep_cpu_s": prep["cpu_seconds"],
        "prep_events_per_s": events / prep["seconds"],
        "prep_peak_rss": prep["peak_rss"],
        "disk_bytes": disk_bytes,
        **{k: load.get(k) for k in loader_keys},
    }


def _public_args(argv: list[str]) -> list[str]:
    """The command line with this machine's paths shown as their option's placeholder."""
    out, hide = [], {"--work": "DIR", "--mtd-python": "PYTHON", "--out": "FILE"}
    for i, x in enumerate(argv):
        out.append(hide[argv[i - 1]] if i and argv[i - 1] in hide else x)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=10_000_000, help="events in the data set")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ehrplan-data-loading"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="small-lstm under --auto: 32")
    ap.add_argument("--batches", type=int, default=300, help="batches timed after the first")
    ap.add_argument("--mtd-python", help="an interpreter with meds-torch-data installed")
    ap.add_argument("--out", type=Path, help="rows file (default: print only)")
    ap.add_argument("--loader", choices=["ehrplan", "mtd"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.loader:
        fn = _loader_ehrplan if a.loader == "ehrplan" else _loader_mtd
        print(json.dumps(fn(a)))
        return

    a.work.mkdir(parents=True, exist_ok=True)
    meds = a.work / f"meds-{a.events}"
    patients = -(-a.events // EVENTS_PER_PATIENT)
    if not (meds / "metadata" / "dataset.json").exists():
        r = _run(
            [
                sys.executable,
                "-m",
                "ehrplan",
                "synth",
                "--patients",
                str(patients),
                "--out",
                str(meds),
                "--json",
            ]
        )
        assert r["rc"] == 0, r["stderr"]
    events = sum(
        __import__("pyarrow.parquet").parquet.read_metadata(p).num_rows
        for p in (meds / "data").rglob("*.parquet")
    )
    rows: list[dict[str, Any]] = []

    # ehrplan
    env = dict(os.environ, EHRPLAN_CACHE=str(a.work / "cache"))
    shutil.rmtree(a.work / "cache", ignore_errors=True)
    prep = _run([sys.executable, "-m", "ehrplan", "data", "prepare", str(meds), "--json"], env)
    assert prep["rc"] == 0, prep["stderr"]
    cache_bytes = json.loads(prep["stdout"])["bytes_on_disk"]
    load = _loader_row(sys.executable, "ehrplan", meds, a, a.workers, env)
    solo = _loader_row(sys.executable, "ehrplan", meds, a, 0, env)
    per_event = (solo["peak_rss"] - solo["rss_before_data"]) / max(solo["events_touched"], 1)
    rows.append(
        {
            "tool": "ehrplan",
            **_tool_row(prep, events, cache_bytes, load),
            "data_rss_per_event_touched": per_event,
        }
    )

    # meds-torch-data
    mtd: dict[str, Any] = {"tool": "meds-torch-data"}
    if not a.mtd_python:
        mtd["error"] = "no --mtd-python given (an interpreter with meds-torch-data)"
    else:
        pyd = a.work / "mtd"
        shutil.rmtree(pyd, ignore_errors=True)
        exe = str(Path(a.mtd_python).parent / "MTD_preprocess")
        bin_dir = str(Path(a.mtd_python).parent)  # its pipeline runs its own console scripts
        mtd_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '')}")
        prep = _run([exe, f"MEDS_dataset_dir={meds}", f"output_dir={pyd}"], mtd_env)
        if prep["rc"] != 0:
            mtd["error"] = "MTD_preprocess failed: " + prep["stderr"].strip()[-300:]
        else:
            size = sum(p.stat().st_size for p in pyd.rglob("*") if p.is_file())
            load = _loader_row(a.mtd_python, "mtd", pyd, a, a.workers, mtd_env)
            mtd |= _tool_row(prep, events, size, load)
    rows.append(mtd)

    head = [
        f"# python benchmarks/data_loading.py {' '.join(_public_args(sys.argv[1:]))}",
        f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {events:,} events, {patients:,} patients; "
        f"{a.workers} workers, batch {a.batch_size}, {a.batches} batches timed; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (shared machine)",
    ]
    lines = [*head, json.dumps(rows, indent=1, default=str)]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
