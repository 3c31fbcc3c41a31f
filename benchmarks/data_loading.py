"""Data loading at scale: ehrplan's loader beside the field's PyTorch MEDS dataset package.

On one synthetic MEDS data set (``ehrplan synth``, about ``--events`` events), for each tool:

- preprocessing: wall seconds, events/s and peak RSS of the process that turns MEDS into what the
  loader reads (``ehrplan data prepare``; meds-torch-data's ``MTD_preprocess``);
- the loader alone, each in a fresh process, for each batch size (``--batch-sizes``) and each
  number of DataLoader workers (``--workers``): time from process start to the first batch,
  examples/s and real events/s over ``--batches`` batches or ``--max-seconds`` (wall, and per
  CPU-second of the process and its workers), peak RSS of the process, and the resident (RSS)
  and proportional (PSS: shared pages split between the processes mapping them) set of the
  process and of each worker just before the workers stop;
- ehrplan only: data RSS per event touched, from a run without workers over one whole epoch of
  the train split (the process's peak RSS minus its RSS after the imports, before the data was
  opened, over the distinct events the epoch's batches hold; ``per_event_read`` divides by every
  event of every batch, repeats included), and the same 2-worker loader with torch's own pickling
  (``torch_pickle``: each tensor of a batch handed over as a shared-memory file descriptor)
  instead of `Batch`'s (by value).

An example is a label row for ehrplan (`ehrplan.data.examples`: cut at its prediction time,
truncated to small-lstm's 50 x 50; examples of one patient whose windows are prefixes of one
another share a sequence, one forward pass, so a batch of B sequences holds more than B examples)
and a subject sequence of at most 2,500 events for meds-torch-data (the same budget of events).
Events/s counts the real codes each batch carries, the figure both tools share. Each measurement
runs in its own process; peak RSS is the kernel's (``wait4``) for that process and the children it
waited for.

ehrplan's loader is `ExampleDataset` (train split) over the memory-mapped example cache that
``data prepare`` built, opened as ``train`` opens it (`prepare_data`, ``cache.examples``).

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


def _ehrplan_train_split(data: str) -> tuple[Any, bool]:
    """small-lstm's train split as `ExampleDataset` over the example cache, opened as ``train``
    opens it, and whether the cache was reused (False: it was built here)."""
    from ehrplan.data.dataset import ExampleDataset
    from ehrplan.runtime.training.data import prepare_data

    cache = prepare_data(Path(data))
    ex = cache.examples(MAX_VISITS, MAX_CODES)
    ds = ExampleDataset(cache, ex, ex.in_split(cache, "train"), cache.tokens)
    return ds, bool(cache.reused)


def _loader_ehrplan(a: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    import ehrplan.data.dataset
    import ehrplan.runtime.training.data  # noqa: F401  (the imports' RSS is not the data's)
    from ehrplan.data.sampler import BucketBatchSampler
    from ehrplan.runtime.batch import IGNORE_INDEX, Batch

    if a.torch_pickle:  # hand batches over the way torch pickles tensors
        del Batch.__reduce__
    before, imported_at = _rss(), time.time()
    ds, reused = _ehrplan_train_split(a.data)
    ready_at = time.time()
    loader = torch.utils.data.DataLoader(
        ds,
        batch_sampler=BucketBatchSampler(ds.lengths, a.batch_size, seed=0),
        collate_fn=ds.collate,
        num_workers=a.workers,
        prefetch_factor=4 if a.workers else None,
        persistent_workers=False,
    )
    out = _iterate(
        loader,
        a,
        before,
        # counted in numpy: a torch reduction here can cost more than the batch (thread start-up)
        lambda b: int(np.count_nonzero(b.stage.numpy() != IGNORE_INDEX)),  # one per example
        lambda b: int(np.count_nonzero(b.code_mask.numpy())),
    )
    if not a.batches:  # a whole epoch: the distinct events its batches hold (a visit cut at
        # different prediction times is read to its longest cut; whole windows can repeat)
        from ehrplan.data.examples import slots

        sl = slots(ds.cohort, ds.examples, ds.seq, np.arange(len(ds)))
        longest = np.zeros(ds.cohort.num_visits, dtype=np.int64)
        np.maximum.at(longest, sl.visits, sl.codes)
        out["distinct_events_touched"] = int(longest.sum())
    return out | {
        "imported_at": imported_at,
        "data_ready_at": ready_at,
        "source": "example cache" if reused else "example cache, built by this process",
        "train_examples": ds.num_examples,
        "train_sequences": len(ds),
    }


def _loader_mtd(a: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from meds_torchdata import MEDSPytorchDataset, MEDSTorchDataConfig

    before, imported_at = _rss(), time.time()
    cfg = MEDSTorchDataConfig(tensorized_cohort_dir=a.data, max_seq_len=MAX_VISITS * MAX_CODES)
    ds = MEDSPytorchDataset(cfg, split="train")
    ready_at = time.time()
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
        return int(np.count_nonzero(codes.numpy()))

    def examples(batch: Any) -> int:
        codes = batch.code if hasattr(batch, "code") else batch["code"]
        return int(codes.shape[0])

    out = _iterate(loader, a, before, examples, events)
    return out | {"imported_at": imported_at, "data_ready_at": ready_at, "source": "tensorized"}


def _cpu() -> float:
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _memory(pid: int | str) -> dict[str, int]:
    """Rss and Pss (bytes) of a process, from /proc/PID/smaps_rollup."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            out[key.lower()] = int(rest.split()[0]) * 1024
    return out


def _iterate(loader: Any, a: argparse.Namespace, before: int, examples: Any, events: Any) -> dict:
    """Time ``a.batches`` batches after the first (0: to the end of the epoch), or as many as
    ``a.max_seconds`` allow."""
    import gc
    import resource

    cpu0 = _cpu()
    it = iter(loader)
    first = next(it)
    t_first = time.time()
    n_examples = n_events = 0
    touched = events(first)
    workers = [w.pid for w in getattr(it, "_workers", [])]
    t0, c0 = time.perf_counter(), time.process_time() + sum(_proc_cpu(w) for w in workers)
    n_batches = 0
    limit = a.batches or len(loader)
    if workers:  # stop before the epoch ends: the workers' CPU is read while they run
        limit = min(limit, len(loader) - 2)
    for batch in it:
        n_batches += 1
        n_examples += examples(batch)
        n_events += events(batch)
        if n_batches >= limit or time.perf_counter() - t0 > a.max_seconds:
            break
    seconds = time.perf_counter() - t0
    cpu = time.process_time() + sum(_proc_cpu(w) for w in workers) - c0
    memory = {"self": _memory("self")} | {f"worker{i}": _memory(w) for i, w in enumerate(workers)}
    del it  # its workers exit and are waited for: their CPU time and peak RSS count below
    gc.collect()
    return {
        "first_batch_at": t_first,
        "batches": n_batches,
        "examples_per_second": n_examples / seconds,
        "examples_per_cpu_second": n_examples / cpu,
        "events_per_second": n_events / seconds,
        "events_per_cpu_second": n_events / cpu,
        "examples": n_examples,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "loader_cpu_seconds": _cpu() - cpu0,
        "events_touched": touched + n_events,  # with repeats: windows of one patient overlap
        "rss_before_data": before,
        "rss_end": _rss(),
        "memory_at_end": memory,
        "peak_rss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }


# ---------------------------------------------------------------------------------------------
# the comparison


def _loader_row(
    python: str,
    kind: str,
    data: Path,
    env: dict[str, str],
    *,
    batch_size: int,
    workers: int,
    batches: int,
    max_seconds: float,
    torch_pickle: bool = False,
) -> dict[str, Any]:
    """One loader run in a fresh process: its figures, time to first batch and peak RSS."""
    cmd = [python, __file__, "--loader", kind, "--data", str(data), "--workers", str(workers)]
    cmd += ["--batch-sizes", str(batch_size), "--batches", str(batches)]
    cmd += ["--max-seconds", str(max_seconds)]
    cmd += ["--torch-pickle"] if torch_pickle else []
    r = _run(cmd, env)
    row: dict[str, Any] = {"batch_size": batch_size, "workers": workers}
    row |= {"torch_pickle": True} if torch_pickle else {}
    row["load_average"] = os.getloadavg()[0]
    if r["rc"] != 0:
        why = r["stderr"].strip().splitlines()[-1] if r["stderr"].strip() else "failed"
        return row | {"error": why}
    doc = json.loads(r["stdout"].strip().splitlines()[-1])
    row["time_to_first_batch"] = doc.pop("first_batch_at") - r["start"]
    # its parts: imports (torch, the tool), opening the data, then the first batch
    row["imports_done_after"] = doc.pop("imported_at") - r["start"]
    row["data_ready_after"] = doc.pop("data_ready_at") - r["start"]
    row["peak_rss"] = r["peak_rss"]
    return row | doc


def _prep_row(prep: dict[str, Any], events: int, disk_bytes: int) -> dict[str, Any]:
    """A tool's preprocessing run and its bytes on disk."""
    return {
        "prep_s": prep["seconds"],
        "prep_cpu_s": prep["cpu_seconds"],
        "prep_events_per_s": events / prep["seconds"],
        "prep_events_per_cpu_s": events / max(prep["cpu_seconds"], 1e-9),
        "prep_peak_rss": prep["peak_rss"],
        "disk_bytes": disk_bytes,
    }


def _public_args(argv: list[str]) -> list[str]:
    """The command line with this machine's paths shown as their option's placeholder."""
    out, hide = [], {"--work": "DIR", "--mtd-python": "PYTHON", "--out": "FILE"}
    for i, x in enumerate(argv):
        out.append(hide[argv[i - 1]] if i and argv[i - 1] in hide else x)
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _summary(rows: list[dict[str, Any]]) -> str:
    """The loader rows as a table for people (the JSON rows hold everything)."""
    lines = [
        f"{'tool':<24}{'batch':>6}{'workers':>8}{'examples/s':>12}{'per CPU-s':>11}"
        f"{'events/s':>12}{'first batch':>12}{'peak RSS':>10}{'PSS all':>9}"
    ]
    for r in rows:
        if r.get("what") != "loader" or "error" in r:
            continue
        pss = sum(m["pss"] for m in r["memory_at_end"].values())
        name = r["tool"] + (" (torch pickle)" if r.get("torch_pickle") else "")
        lines.append(
            f"{name:<24}{r['batch_size']:>6}{r['workers']:>8}{r['examples_per_second']:>12,.0f}"
            f"{r['examples_per_cpu_second']:>11,.0f}{r['events_per_second']:>12,.0f}"
            f"{r['time_to_first_batch']:>11.1f}s{r['peak_rss'] / 2**20:>8.0f}Mi"
            f"{pss / 2**20:>7.0f}Mi"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=10_000_000, help="events in the data set")
    ap.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/ehrplan-data-loading"),
        help="folder for the data set, both tools' preprocessed data and the example cache",
    )
    ap.add_argument("--workers", type=_ints, default=[0, 2], help="DataLoader workers, e.g. 0,2")
    ap.add_argument(
        "--batch-sizes",
        type=_ints,
        default=[4, 32],
        help="loader batch sizes (sequences for ehrplan): small-lstm's micro-batch 4, and 32",
    )
    ap.add_argument("--batches", type=int, default=2000, help="batches timed after the first")
    ap.add_argument(
        "--max-seconds", type=float, default=30.0, help="stop timing a loader after this long"
    )
    ap.add_argument("--mtd-python", help="an interpreter with meds-torch-data installed")
    ap.add_argument("--out", type=Path, help="rows file (default: print only)")
    ap.add_argument("--loader", choices=["ehrplan", "mtd"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--torch-pickle", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.loader:
        fn = _loader_ehrplan if a.loader == "ehrplan" else _loader_mtd
        a.workers, a.batch_size = a.workers[0], a.batch_sizes[0]
        print(json.dumps(fn(a)))
        return

    load_start = os.getloadavg()
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
    grid = [(b, w) for b in a.batch_sizes for w in a.workers]

    # ehrplan
    env = dict(os.environ, EHRPLAN_CACHE=str(a.work / "cache"))
    shutil.rmtree(a.work / "cache", ignore_errors=True)
    prep = _run([sys.executable, "-m", "ehrplan", "data", "prepare", str(meds), "--json"], env)
    assert prep["rc"] == 0, prep["stderr"]
    cache_bytes = json.loads(prep["stdout"])["bytes_on_disk"]
    rows.append({"tool": "ehrplan", "what": "preprocessing"} | _prep_row(prep, events, cache_bytes))
    one = {"batches": a.batches, "max_seconds": a.max_seconds}
    for b, w in grid:
        row = _loader_row(sys.executable, "ehrplan", meds, env, batch_size=b, workers=w, **one)
        rows.append({"tool": "ehrplan", "what": "loader"} | row)
    if any(w > 0 for w in a.workers):
        for b in a.batch_sizes:
            w = max(a.workers)
            kw = {"batch_size": b, "workers": w, "torch_pickle": True} | one
            rows.append(
                {"tool": "ehrplan", "what": "loader"}
                | _loader_row(sys.executable, "ehrplan", meds, env, **kw)
            )
    whole = {"batch_size": max(a.batch_sizes), "workers": 0, "batches": 0, "max_seconds": 1e9}
    epoch = _loader_row(sys.executable, "ehrplan", meds, env, **whole)
    if "error" not in epoch:  # the peak before the distinct events were counted
        data_rss = epoch["peak_rss_self"] - epoch["rss_before_data"]
        epoch |= {
            "data_rss": data_rss,
            "data_rss_per_event_touched": data_rss / max(epoch["distinct_events_touched"], 1),
            "data_rss_per_event_read": data_rss / max(epoch["events_touched"], 1),
        }
    rows.append({"tool": "ehrplan", "what": "data memory, one train epoch"} | epoch)

    # meds-torch-data
    if not a.mtd_python:
        why = "no --mtd-python given (an interpreter with meds-torch-data)"
        rows.append({"tool": "meds-torch-data", "error": why})
    else:
        pyd = a.work / "mtd"
        shutil.rmtree(pyd, ignore_errors=True)
        exe = str(Path(a.mtd_python).parent / "MTD_preprocess")
        bin_dir = str(Path(a.mtd_python).parent)  # its pipeline runs its own console scripts
        mtd_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '')}")
        prep = _run([exe, f"MEDS_dataset_dir={meds}", f"output_dir={pyd}"], mtd_env)
        if prep["rc"] != 0:
            why = "MTD_preprocess failed: " + prep["stderr"].strip()[-300:]
            rows.append({"tool": "meds-torch-data", "error": why})
        else:
            size = sum(p.stat().st_size for p in pyd.rglob("*") if p.is_file())
            rows.append(
                {"tool": "meds-torch-data", "what": "preprocessing"} | _prep_row(prep, events, size)
            )
            for b, w in grid:
                row = _loader_row(a.mtd_python, "mtd", pyd, mtd_env, batch_size=b, workers=w, **one)
                rows.append({"tool": "meds-torch-data", "what": "loader"} | row)

    load_end = os.getloadavg()
    head = [
        f"# python benchmarks/data_loading.py {' '.join(_public_args(sys.argv[1:]))}",
        f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {events:,} events, {patients:,} patients; "
        f"batch sizes {a.batch_sizes}, workers {a.workers}, up to {a.batches} batches or "
        f"{a.max_seconds:g} s timed per loader; "
        f"load average {load_start[0]:.1f} (1 min) / {load_start[1]:.1f} (5 min) at the start, "
        f"{load_end[0]:.1f} / {load_end[1]:.1f} at the end, on {os.cpu_count()} CPUs (shared "
        "machine; each loader row has the 1-minute load average when it ended)",
        "# examples: label rows for ehrplan (several can share one sequence: batch sizes count "
        "sequences), subject sequences for meds-torch-data; events: real codes in the batches",
    ]
    lines = [*head, json.dumps(rows, indent=1, default=str)]
    text = "\n".join(lines) + "\n"
    print(text)
    print(_summary(rows))
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
