"""Building the example cache: two passes over the data files, each in a pool of worker processes.

Pass 1 (skipped when a vocabulary is given): each file's train-split tokens are counted
(`VocabCounter`, one per file, returned to the parent and merged in file order).

Pass 2: each file becomes a cohort (`build_cohort`: visits, time features, splits) and its label
rows become examples (`build_examples` on that cohort and the rows of its subjects). A worker
writes the file's token ids and offsets as part files in the build folder and returns the small
rest (per-file counts, the examples' positions, the UNK tallies); the parent appends the parts in
file order, offsets shifted, and removes each part once appended. Examples are written sorted by
label row, as `build_examples` orders them over the whole data set.

Workers are forked where the platform allows it (they share the parent's label rows and
vocabulary without a copy), spawned elsewhere; they ignore Ctrl-C (the parent stops the pool and
removes the build folder) and, on Linux, die with the parent. One worker runs in the parent
process itself. The bytes written do not depend on the number of workers.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ehrplan.data import meds
from ehrplan.data.cohort import _fill_static_times, build_cohort, hashed_splits
from ehrplan.data.examples import build_examples
from ehrplan.data.tasks import TaskLabels
from ehrplan.data.vocab import UNK_ID, Vocab, VocabCounter

HEADER_BYTES = 128  # every .npy header is padded to this, so the shape can be set at the end
NO_ID = np.iinfo(np.int32).max  # a raw code none of whose events has an id of its own
FILE_DELAY_ENV = "EHRPLAN_CACHE_FILE_DELAY"  # tests only: seconds a worker sleeps per data file


# --------------------------------------------------------------------------------------------
# .npy files written block by block


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 .npy header padded to `HEADER_BYTES` (the shape can grow in place)."""
    d = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    text = repr(d).encode("latin1")
    pad = HEADER_BYTES - 10 - len(text) - 1
    return (
        b"\x93NUMPY\x01\x00"
        + (HEADER_BYTES - 10).to_bytes(2, "little")
        + text
        + (b" " * pad)
        + b"\n"
    )


class Appender:
    """One .npy file written row block by row block; its header gets the final shape at the end."""

    def __init__(self, path: Path, dtype: str, tail: tuple[int, ...] = ()) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.tail = tail
        self.rows = 0
        self.f: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.f.write(npy_header(self.dtype, (0, *tail)))

    def add(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=self.dtype)
        self.f.write(a.tobytes())
        self.rows += len(a)

    def close(self) -> dict[str, Any]:
        shape = (self.rows, *self.tail)
        self.f.seek(0)
        self.f.write(npy_header(self.dtype, shape))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {"dtype": self.dtype.name, "shape": list(shape), "bytes": self.path.stat().st_size}

    def abandon(self) -> None:
        if not self.f.closed:
            self.f.close()


def write_array(path: Path, a: np.ndarray) -> dict[str, Any]:
    """A whole array as one .npy file with the cache's header size."""
    out = Appender(path, a.dtype.name, tuple(a.shape[1:]))
    try:
        out.add(a)
        return out.close()
    finally:
        out.abandon()


# --------------------------------------------------------------------------------------------
# what every worker knows


@dataclass(frozen=True)
class Splits:
    """The splits file as sorted subject ids and each one's split (an index into ``names``,
    our names after ``--splits``); None of these when the split is hashed."""

    sorted_sid: np.ndarray
    code: np.ndarray
    names: list[str]
    file_map: dict[int, str]
    """subject -> the file's split name, as `build_cohort` takes it."""


@dataclass(frozen=True)
class Job:
    """Everything a worker needs: shipped once per worker (shared, when forked)."""

    root: Path
    files: list[Path]
    tmp: Path
    window_hours: float
    split_names: dict[str, str] | None
    """ours -> the file's (``--splits``)."""
    splits: Splits | None
    names: list[str]
    """Our split names, in the order the cache's ``split`` codes index."""
    vocab: Vocab | None = None
    token_dtype: str = "int16"
    label_sid: np.ndarray | None = None
    """The task's label rows' subjects and times, in file order (None: no task)."""
    label_time: np.ndarray | None = None
    label_order: np.ndarray | None = None
    """A stable argsort of ``label_sid``."""
    label_sorted_sid: np.ndarray | None = None
    """``label_sid[label_order]``."""
    task_name: str = ""
    task_kind: str = "binary"


_JOB: Job | None = None


def split_table(root: Path, split_names: dict[str, str] | None) -> Splits | None:
    """The splits file read once, our names applied (as `build_cohort` applies them)."""
    m = meds.read_splits(root)
    if m is None:
        return None
    rename = {v: k for k, v in (split_names or {}).items()}
    sid = np.fromiter(m.keys(), dtype=np.int64, count=len(m))
    ours = [rename.get(n, n) for n in m.values()]
    names = sorted(set(ours))
    lookup = {n: i for i, n in enumerate(names)}
    code = np.array([lookup[n] for n in ours], dtype=np.int8)
    order = np.argsort(sid, kind="stable")
    return Splits(sorted_sid=sid[order], code=code[order], names=names, file_map=m)


def _train_mask(job: Job, sid: np.ndarray) -> np.ndarray:
    """Events of train-split subjects (hashed 80/10/10 without a splits file)."""
    if job.splits is None:
        starts = np.flatnonzero(np.diff(sid, prepend=sid[0] - 1)) if len(sid) else sid[:0]
        per_subject = hashed_splits(sid[starts]) == "train"
        return np.repeat(per_subject, np.diff(np.append(starts, len(sid))))
    s = job.splits
    if not len(s.sorted_sid) or "train" not in s.names:
        return np.zeros(len(sid), dtype=bool)
    pos = np.minimum(np.searchsorted(s.sorted_sid, sid), len(s.sorted_sid) - 1)
    return (s.sorted_sid[pos] == sid) & (s.code[pos] == s.names.index("train"))


def vocab_part(i: int) -> VocabCounter:
    """Pass 1: one file's train-split tokens."""
    job = _current()
    counter = VocabCounter()
    got = meds.read_data_file(job.files[i], dictionary=True)
    if got is None:
        return counter
    sid, t, code, value = got
    counter.rows = len(sid)
    _, keep = _fill_static_times(sid, t)
    train = keep & _train_mask(job, sid)
    counter.add(code.filter(pa.array(train)), value[train])
    return counter


def merge_counters(parts: Iterator[VocabCounter]) -> VocabCounter:
    total = VocabCounter()
    for c in parts:
        total.events += c.events
        total.rows += c.rows
        for name, n in c.bare.items():
            total.bare[name] = total.bare.get(name, 0) + n
        for name, vals in c.values.items():
            total.values.setdefault(name, []).extend(vals)
    return total


def _label_rows(job: Job, subjects: np.ndarray) -> np.ndarray:
    """The label rows (file order) of the given subjects."""
    assert job.label_sorted_sid is not None and job.label_order is not None
    sorted_sid = job.label_sorted_sid
    lo = np.searchsorted(sorted_sid, subjects, side="left")
    hi = np.searchsorted(sorted_sid, subjects, side="right")
    n = hi - lo
    within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    return np.sort(job.label_order[np.repeat(lo, n) + within])


def _code_min_ids(code: pa.DictionaryArray, ids: np.ndarray) -> dict[str, int]:
    """Each raw code of the file: the smallest id its events have other than UNK (`NO_ID` when
    all are UNK); a vocabulary cap ``k`` maps the code wholly to UNK when that id is >= k."""
    idx = code.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    names = code.dictionary.to_pylist()
    present = np.bincount(idx, minlength=len(names)) > 0
    low = np.full(len(names), NO_ID, dtype=np.int64)
    real = ids != UNK_ID
    np.minimum.at(low, idx[real], ids[real])
    return {names[j]: int(low[j]) for j in np.flatnonzero(present)}


def data_part(i: int) -> dict[str, Any]:
    """Pass 2: one file's arrays (written as parts) and its small rest (returned)."""
    job = _current()
    assert job.vocab is not None
    delay = float(os.environ.get(FILE_DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)
    out: dict[str, Any] = {"index": i, "subjects": np.zeros(0, np.int64), "report": {}}
    got = meds.read_data_file(job.files[i], dictionary=True)
    if got is None:
        return out
    sid, t, code, value = got
    out["subjects"] = sid[np.flatnonzero(np.diff(sid, prepend=sid[0] - 1))]
    if not (t != meds.NULL_TIME).any():
        out["report"] = {"static_only_events_dropped": len(sid)}
        return out
    c = build_cohort(
        str(job.root),
        sid,
        t,
        code,
        value,
        split_map=job.splits.file_map if job.splits is not None else None,
        window_hours=job.window_hours,
        split_names=job.split_names,
    )
    out["report"] = dict(c.report)
    codes = c.code if pa.types.is_dictionary(c.code.type) else pc.dictionary_encode(c.code)
    ids = job.vocab.encode_dictionary(codes, c.numeric_value)
    lookup = {n: k for k, n in enumerate(job.names)}
    parts = {
        "tokens": ids.astype(job.token_dtype),
        "event_offsets": c.event_offsets[1:],
        "visit_offsets": c.visit_offsets[1:],
        "time_features": c.time_features,
        "subject_ids": c.subject_ids,
        "split": np.array([lookup.get(s, -1) for s in c.split.tolist()], dtype=np.int8),
    }
    for name, a in parts.items():
        np.save(job.tmp / f"part-{i}.{name}.npy", a, allow_pickle=False)
    out["counts"] = (c.num_events, c.num_visits, c.num_patients)
    out["token_counts"] = np.bincount(ids, minlength=len(job.vocab))
    out["code_min_id"] = _code_min_ids(codes, ids)
    if job.label_sid is not None:
        out["examples"] = _examples(job, c)
    return out


def _examples(job: Job, c: Any) -> dict[str, Any]:
    """The examples of this file's label rows, in file-local positions, and their counts."""
    assert job.label_time is not None and job.label_sid is not None
    rows = _label_rows(job, c.subject_ids)
    empty = np.zeros(0, np.int64)
    if not len(rows):
        return {"rows": 0, "before": 0, "cols": (empty, empty, empty, empty)}
    lab = TaskLabels(
        name=job.task_name,
        kind="binary",  # only the rows' positions are used here; values come from the parent
        subject_id=job.label_sid[rows],
        prediction_time=job.label_time[rows],
        value=np.zeros(len(rows), dtype=bool),
        files=("",),
    )
    ex = build_examples(c, lab, 1, 1)
    cols = (ex.patient, ex.last_visit, ex.last_events, rows[ex.label_row])
    return {"rows": len(rows), "before": ex.report["labels_before_first_event"], "cols": cols}


def _current() -> Job:
    if _JOB is None:  # pragma: no cover - set by run_pool or the worker's initializer
        raise RuntimeError("no cache build in progress")
    return _JOB


# --------------------------------------------------------------------------------------------
# the pool


def _die_with_parent() -> None:
    """Linux: the kernel sends this worker SIGKILL when its parent dies (killed mid-build)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl: nothing to do
        pass


def _init_worker(job: Job) -> None:
    global _JOB
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    _die_with_parent()
    pa.set_cpu_count(1)  # one decoding thread a worker: the workers are the parallelism
    _JOB = job


def run_pool(fn: Callable[[int], Any], job: Job, workers: int) -> Iterator[Any]:
    """``fn(i)`` for every file ``i`` of ``job``, results in file order; ``workers`` processes
    (1: in this process). Stopping early (an error, Ctrl-C) terminates the workers."""
    global _JOB
    n = len(job.files)
    if workers <= 1 or n <= 1:
        _JOB = job
        try:
            for i in range(n):
                yield fn(i)
        finally:
            _JOB = None
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ctx.Pool(min(workers, n), initializer=_init_worker, initargs=(job,))
    try:
        yield from pool.imap(fn, range(n))
        pool.close()
    finally:
        pool.terminate()
        pool.join()


class Progress:
    """Calls ``say`` with ``done/total files``: first after `FIRST_SECONDS` (then with the
    ``title`` line before it), then at most every `EVERY_SECONDS`. A build that ends (or
    fails) sooner says nothing, so a small data set or a bad file gets no line before its
    result or its one error line."""

    FIRST_SECONDS = 2.0
    EVERY_SECONDS = 10.0

    def __init__(self, say: Callable[[str], None] | None, total: int, title: str = "") -> None:
        self.say, self.total, self.title = say, total, title
        self.last = time.monotonic()
        self.spoke = False

    def step(self, done: int, what: str) -> None:
        now = time.monotonic()
        wait = self.EVERY_SECONDS if self.spoke else self.FIRST_SECONDS
        if self.say is not None and now - self.last >= wait:
            if not self.spoke and self.title:
                self.say(self.title)
            self.say(f"  {what}: {done}/{self.total} data files")
            self.last, self.spoke = now, True
