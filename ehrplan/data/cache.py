"""The example cache: a MEDS data set's training examples as memory-mapped arrays (no torch).

`prepare` reads the data files in worker processes (`ehrplan.data.cache_build`), twice: a first
pass counts the train split's tokens for the vocabulary (skipped when a vocabulary is given), a
second groups each file's events into visits, cuts its subjects' label rows into examples
(`ehrplan.data.examples.build_examples`) and writes token ids. Peak memory is one file's events
per worker, the task's label rows, the examples' positions and the vocabulary pass's lab values
(4 bytes each), never the whole data set.

Layout, under ``$EHRPLAN_CACHE/examples/<key>/`` (the data folder may be read-only):

- ``header.json``: format, version, the data fingerprint (every data, label and split file's
  relative name, size and mtime), the content fingerprint (`meds.fingerprint`), the build
  settings, the task (name, path, kind, files), split names, counts, the label report, and each
  array's dtype, shape and byte size.
- ``vocab.json``: the vocabulary the token ids index (`Vocab`), uncapped.
- one ``.npy`` per array: ``tokens`` (int16 when the vocabulary fits, else int32) [E],
  ``event_offsets`` [V+1] and ``visit_offsets`` [P+1] (int64), ``time_features`` (float32
  [V, 2]), per patient ``subject_ids`` (int64) and ``split`` (int8 index into the header's split
  names, -1 unlisted); ``token_counts`` [vocab] (events per id, all splits) and ``code_min_id``
  [distinct raw codes] (each code's smallest id other than UNK), from which the UNK share under
  any vocabulary cap follows; with a task, per example (label row, ordered by it): ``ex_patient``,
  ``ex_last_visit``, ``ex_last_events``, ``ex_label_row`` (int64), ``ex_value`` (bool, int64 or
  float64 by the task's kind), ``ex_prediction_time``, ``ex_subject_id`` (int64), and for the CKD
  composite ``ex_days`` (float64) and ``ex_observed`` (bool). Only the parts of an example that
  do not depend on ``max_visits`` are stored; `ExampleCache.examples` derives the rest.

The key hashes the data fingerprint with the settings (the task as `resolve_task` resolves it,
the split names, the visit window, the vocabulary cut-off and bins, a given vocabulary's hash),
so any change gets another cache. A cache is built in a temporary folder beside its final place
and renamed at the end: a build killed at any moment leaves the old cache or none. `open_cache`
checks the header against the data and every array's size and npy header; anything off
(truncated, corrupt, another format version, changed data) is rebuilt, never read. A full disk
stops the build with one line naming the path.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import shutil
import sys
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ehrplan.atomic import ensure_dir, output_error
from ehrplan.data import cache_build as build
from ehrplan.data import meds
from ehrplan.data.cohort import DEFAULT_WINDOW_HOURS, IGNORE_INDEX
from ehrplan.data.vocab import DEFAULT_MIN_COUNT, DEFAULT_VALUE_BINS, UNK_ID, Vocab
from ehrplan.errors import DataError, OutputError

FORMAT = "ehrplan-example-cache"
VERSION = 2
CACHE_ENV = "EHRPLAN_CACHE"
_HEADER_BYTES = build.HEADER_BYTES
_INT16_MAX = np.iinfo(np.int16).max

ARRAYS: dict[str, tuple[str, tuple[int, ...]]] = {
    # name: (dtype, trailing shape); tokens' dtype is chosen by the vocabulary's size
    "tokens": ("int16", ()),
    "event_offsets": ("int64", ()),
    "visit_offsets": ("int64", ()),
    "time_features": ("float32", (2,)),
    "subject_ids": ("int64", ()),
    "split": ("int8", ()),
}
EXAMPLE_ARRAYS = (
    "ex_patient",
    "ex_last_visit",
    "ex_last_events",
    "ex_label_row",
    "ex_value",
    "ex_prediction_time",
    "ex_subject_id",
)
CKD_ARRAYS = ("ex_days", "ex_observed")
TALLY_ARRAYS = ("token_counts", "code_min_id")


def default_workers() -> int:
    """Build processes when none are asked for: two, or one on a one-core machine. At 38M events
    on two quiet cores two workers built at 4.6M-5.0M events/s against 3.1M-3.3M for one, for 6-10%
    more CPU (`benchmarks/cache_build.py`); on cores other work already fills they gain nothing."""
    return max(1, min(2, os.cpu_count() or 1))


def cache_root() -> Path:
    """``$EHRPLAN_CACHE`` or ``~/.cache/ehrplan``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "ehrplan"


def fingerprint(root: Path, label_path: Path | None) -> list[list[Any]]:
    """Each input file's name (relative to the root), size and mtime in nanoseconds."""
    files = meds.data_files(root)
    if label_path is not None and label_path.exists():
        files += meds.label_files(label_path)
    if (root / meds.SPLITS_FILE).is_file():
        files.append(root / meds.SPLITS_FILE)
    out = []
    for f in files:
        st = f.stat()
        name = str(f.relative_to(root)) if f.is_relative_to(root) else str(f.absolute())
        out.append([name, st.st_size, st.st_mtime_ns])
    return out


def vocab_hash(vocab: Vocab) -> str:
    return hashlib.sha256(json.dumps(vocab.to_json(), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Settings:
    """What, besides the data, decides a cache's content."""

    task: str | None = None
    """The task's name as `resolve_task` names it; None: no task (no examples)."""
    task_path: str | None = None
    """Its label file or folder (absolute)."""
    splits: tuple[tuple[str, str], ...] | None = None
    """``--splits`` as sorted (ours, the file's) pairs; None: the names as they are."""
    window_hours: float = DEFAULT_WINDOW_HOURS
    min_count: int = DEFAULT_MIN_COUNT
    value_bins: int = DEFAULT_VALUE_BINS
    vocab: str | None = None
    """The hash of a given vocabulary (a resumed run's); None: built on the train split."""

    @classmethod
    def for_request(
        cls,
        root: str | Path,
        task: str | None = None,
        labels: str | Path | None = None,
        splits: str | None = None,
        *,
        optional_task: bool = False,
        **kw: Any,
    ) -> Settings:
        """The settings of a command's data options: the task resolved (`resolve_task`) and
        ``--splits`` parsed. ``optional_task``: no task and several tasks give a cache without
        examples instead of an error (for counts only: `recommend --data`)."""
        from ehrplan.data.cohort import parse_split_names
        from ehrplan.data.tasks import find_tasks, resolve_task

        mapping = parse_split_names(splits)
        pairs = tuple(sorted(mapping.items())) if mapping else None
        if optional_task and task is None and labels is None and len(find_tasks(root)) != 1:
            return cls(splits=pairs, **kw)
        src = resolve_task(root, task, labels)
        return cls(task=src.name, task_path=str(src.path.absolute()), splits=pairs, **kw)

    def split_names(self) -> dict[str, str] | None:
        return dict(self.splits) if self.splits else None

    def label_path(self) -> Path | None:
        return Path(self.task_path) if self.task_path is not None else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["splits"] = [list(p) for p in self.splits] if self.splits else None
        return d


def cache_key(root: Path, settings: Settings) -> tuple[str, list[list[Any]]]:
    fp = fingerprint(root, settings.label_path())
    doc = {"root": str(root.absolute()), "files": fp, "settings": settings.to_json()}
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    return digest[:20], fp


# --------------------------------------------------------------------------------------------
# building


def _build(
    root: Path,
    tmp: Path,
    settings: Settings,
    vocab: Vocab | None,
    workers: int,
    say: Callable[[str], None] | None,
) -> dict[str, Any]:
    from ehrplan.data.tasks import TaskSource, read_task

    files = meds.data_files(root)
    split_names = settings.split_names()
    splits = build.split_table(root, split_names)
    names = splits.names if splits is not None else ["held_out", "train", "tuning"]
    labels = None
    if settings.task is not None and settings.task_path is not None:
        labels = read_task(TaskSource(settings.task, Path(settings.task_path)))
    pa.default_memory_pool().release_unused()  # the split and label tables' freed buffers
    job = build.Job(
        root=root,
        files=files,
        tmp=tmp,
        window_hours=settings.window_hours,
        split_names=split_names,
        splits=splits,
        names=names,
    )
    progress = build.Progress(say, len(files), f"building the example cache of {root} (first use)")
    if vocab is None:
        with closing(build.run_pool(build.vocab_part, job, workers)) as parts:
            counter = build.merge_counters(
                _stepped(parts, lambda k: progress.step(k, "vocabulary pass"))
            )
        if counter.rows == 0:  # as the whole-data reader says it
            raise DataError(f"{root / meds.DATA_DIR}: no events in {len(files)} parquet file(s)")
        vocab = counter.vocab(min_count=settings.min_count, value_bins=settings.value_bins)
    vocab.save(tmp / "vocab.json")
    token_dtype = "int16" if len(vocab) <= _INT16_MAX else "int32"
    job = replace(job, vocab=vocab, token_dtype=token_dtype)
    if labels is not None:
        order = np.argsort(labels.subject_id, kind="stable")
        job = replace(
            job,
            label_sid=labels.subject_id,
            label_time=labels.prediction_time,
            label_order=order,
            label_sorted_sid=labels.subject_id[order],
            task_name=labels.name,
            task_kind=labels.kind,
        )
    out = {
        name: build.Appender(tmp / f"{name}.npy", token_dtype if name == "tokens" else dt, tail)
        for name, (dt, tail) in ARRAYS.items()
    }
    try:
        body = _second_pass(root, job, out, workers, progress)
        arrays = {name: a.close() for name, a in out.items()}
    finally:
        for a in out.values():
            a.abandon()
    tallies, ex = body.pop("tallies"), body.pop("examples")
    arrays["token_counts"] = build.write_array(tmp / "token_counts.npy", tallies[0])
    arrays["code_min_id"] = build.write_array(tmp / "code_min_id.npy", tallies[1])
    task = None
    if labels is not None:
        arrays |= _write_examples(tmp, labels, ex, body["report"])
        task = {
            "name": labels.name,
            "path": settings.task_path,
            "kind": labels.kind,
            "files": list(labels.files),
        }
    return {
        **body,
        "vocab_hash": vocab_hash(vocab),
        "vocab_size": len(vocab),
        "split_names": names,
        "task": task,
        "arrays": arrays,
    }


def _stepped(parts: Any, step: Callable[[int], None]) -> Any:
    for k, p in enumerate(parts, 1):
        step(k)
        yield p


@dataclass
class _Gather:
    """The parent's side of pass 2: appends each file's parts in file order, offsets shifted,
    and sums the rest."""

    job: build.Job
    out: dict[str, build.Appender]
    events: int = 0
    visits: int = 0
    patients: int = 0
    label_rows: int = 0
    before: int = 0
    report: dict[str, Any] = field(default_factory=dict)
    seen: list[np.ndarray] = field(default_factory=list)
    code_min: dict[str, int] = field(default_factory=dict)
    ex_cols: list[list[np.ndarray]] = field(default_factory=lambda: [[], [], [], []])
    token_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def add(self, got: dict[str, Any]) -> None:
        self.seen.append(got["subjects"])
        for key, n in got["report"].items():
            self.report[key] = self.report.get(key, 0) + n
        if "counts" not in got:
            return
        i = got["index"]
        shift = {"event_offsets": self.events, "visit_offsets": self.visits}
        for name in ARRAYS:
            part = self.job.tmp / f"part-{i}.{name}.npy"
            a = np.load(part, mmap_mode="r")
            self.out[name].add(a + shift[name] if name in shift else a)
            del a
            part.unlink()
        self.token_counts = self.token_counts + got["token_counts"]
        for name, low in got["code_min_id"].items():
            self.code_min[name] = min(self.code_min.get(name, low), low)
        if "examples" in got:
            e = got["examples"]
            self.label_rows += e["rows"]
            self.before += e["before"]
            p, last, le, row = e["cols"]
            shifted = (p + self.patients, last + self.visits, le, row)
            for col, a in zip(self.ex_cols, shifted, strict=True):
                col.append(a)
        n_ev, n_vis, n_pat = got["counts"]
        self.events += n_ev
        self.visits += n_vis
        self.patients += n_pat


def _second_pass(
    root: Path,
    job: build.Job,
    out: dict[str, build.Appender],
    workers: int,
    progress: build.Progress,
) -> dict[str, Any]:
    """Pass 2 over every file (`_Gather`); the checks that need every file; the label report."""
    assert job.vocab is not None
    out["event_offsets"].add(np.zeros(1, np.int64))
    out["visit_offsets"].add(np.zeros(1, np.int64))
    g = _Gather(job=job, out=out, token_counts=np.zeros(len(job.vocab), dtype=np.int64))
    with closing(build.run_pool(build.data_part, job, workers)) as parts:
        for k, got in enumerate(parts, 1):
            g.add(got)
            progress.step(k, "examples pass")
    if not g.events:
        raise DataError(f"{root / meds.DATA_DIR}: no timed events in {len(job.files)} file(s)")
    all_sid = np.concatenate(g.seen)
    if len(np.unique(all_sid)) != len(all_sid):
        meds.read_events(root)  # names the file and subject split across files
    report = g.report
    if "splits_file_missing" in report:
        report["splits_file_missing"] = 1
    examples = None
    if job.label_sid is not None:
        examples = [np.concatenate(c) if c else np.zeros(0, np.int64) for c in g.ex_cols]
        report["_labels"] = {
            "label_rows": len(job.label_sid),
            "labels_unknown_subject": len(job.label_sid) - g.label_rows,
            "labels_before_first_event": g.before,
            "examples": len(examples[0]),
        }
    low = np.fromiter(g.code_min.values(), np.int32, len(g.code_min))
    return {
        "counts": {"patients": g.patients, "visits": g.visits, "events": g.events},
        "report": report,
        "tallies": (g.token_counts, low),
        "examples": examples,
    }


def _write_examples(
    tmp: Path, labels: Any, cols: list[np.ndarray], report: dict[str, Any]
) -> dict[str, Any]:
    """The examples sorted by label row, their labels taken from the label rows."""
    label_report = report.pop("_labels")
    if label_report["label_rows"] == label_report["labels_unknown_subject"]:
        raise DataError(
            f"{labels.files[0]}: none of the {len(labels):,} label rows names a subject of the "
            f"data (e.g. subject {int(labels.subject_id[0])})"
        )
    order = np.argsort(cols[3], kind="stable")
    rows = cols[3][order]
    columns: dict[str, Callable[[], np.ndarray]] = {  # made and written one at a time
        "ex_patient": lambda: cols[0][order],
        "ex_last_visit": lambda: cols[1][order],
        "ex_last_events": lambda: cols[2][order],
        "ex_label_row": lambda: rows,
        "ex_value": lambda: labels.value[rows],
        "ex_prediction_time": lambda: labels.prediction_time[rows],
        "ex_subject_id": lambda: labels.subject_id[rows],
    }
    if labels.days is not None and labels.observed is not None:
        columns["ex_days"] = lambda: labels.days[rows]
        columns["ex_observed"] = lambda: labels.observed[rows]
    report["labels"] = label_report
    return {name: build.write_array(tmp / f"{name}.npy", make()) for name, make in columns.items()}


def prepare(
    root: str | Path,
    settings: Settings | None = None,
    vocab: Vocab | None = None,
    *,
    workers: int | None = None,
    say: Callable[[str], None] | None = None,
) -> ExampleCache:
    """The cache of ``root``: opened when valid, otherwise built (atomically) and opened.
    ``workers``: build processes (default `default_workers`); ``say``: called with progress
    lines while a build runs, the first after 2 s (nothing for a quick build or when reused)."""
    root = meds.check_root(root)
    settings = settings or Settings()
    if vocab is not None:
        settings = Settings(**(settings.__dict__ | {"vocab": vocab_hash(vocab)}))
    key, fp = cache_key(root, settings)
    final = cache_root() / "examples" / key
    cache = open_cache(final, root, fp)
    if cache is not None:
        return cache
    try:
        ensure_dir(final.parent)
        _remove_stale(final.parent)
        tmp = final.with_name(f".{key}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except (OSError, OutputError) as err:  # a read-only cache, a file where its folder goes
        why = err if isinstance(err, OutputError) else output_error(final, err)
        raise OutputError(
            f"{why} (the example cache: set ${CACHE_ENV} to a writable folder)"
        ) from None
    try:
        body = _build(root, tmp, settings, vocab, workers or default_workers(), say)
        header = {
            "format": FORMAT,
            "version": VERSION,
            "data": str(root.absolute()),
            "fingerprint": fp,
            "content_fingerprint": meds.fingerprint(root),
            "settings": settings.to_json(),
            "window_hours": settings.window_hours,
            **body,
        }
        (tmp / "header.json").write_text(json.dumps(header, indent=2, sort_keys=True) + "\n")
        if open_cache(final, root, fp) is not None:  # another process (a rank) won the race
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            if final.exists():  # an invalid old cache: out of the way, then ours in its place
                old = final.with_name(f".{key}.{os.getpid()}.old")
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(
                f"{final}: no space left on the device while building the example cache "
                f"(set ${CACHE_ENV} to a disk with room)"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cache = open_cache(final, root, fp)
    if cache is None:  # pragma: no cover - a cache just written is valid
        raise DataError(f"{final}: the example cache just built does not read back")
    cache.reused = False
    return cache


def _remove_stale(parent: Path) -> None:
    """Temporary folders of builds whose process is gone (killed mid-build)."""
    for p in parent.glob(".*.tmp"):
        try:
            pid = int(p.name.split(".")[-2])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass


# --------------------------------------------------------------------------------------------
# reading


@dataclass
class ExampleCache:
    """A built cache, its arrays memory-mapped: the cohort attributes `ExampleDataset` and the
    truncation and shape counts read (offsets, time features, subjects, splits), ``tokens``, and
    the task's examples (`examples`)."""

    path: Path
    header: dict[str, Any]
    vocab: Vocab
    arrays: dict[str, np.ndarray] = field(repr=False)
    reused: bool = True
    """False when `prepare` built it just now."""

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without its arrays (a DataLoader worker started by spawn maps the files
        again instead of receiving a copy)."""
        return {"path": self.path, "header": self.header, "vocab": self.vocab, "reused": True}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.arrays = _map(self.path, state["header"]["arrays"])

    def __getattr__(self, name: str) -> np.ndarray:
        arrays = self.__dict__.get("arrays", {})
        if name in arrays:
            return arrays[name]
        raise AttributeError(name)

    @property
    def root(self) -> str:
        return str(self.header["data"])

    @property
    def window_hours(self) -> float:
        return float(self.header["window_hours"])

    @property
    def report(self) -> dict[str, int]:
        return {k: v for k, v in self.header["report"].items() if k != "labels"}

    @property
    def task(self) -> dict[str, Any] | None:
        """The task's name, path, kind and label files; None when the cache has none."""
        return self.header.get("task")

    @property
    def split(self) -> np.ndarray:
        """str [P]: each patient's split name ("" where the splits file does not list it)."""
        got = self.__dict__.get("_split")
        if got is None:
            names = np.array([*self.header["split_names"], ""], dtype=object)
            got = self.__dict__["_split"] = names[self.arrays["split"]]  # -1 (unlisted) -> ""
        return got

    @property
    def num_patients(self) -> int:
        return len(self.arrays["subject_ids"])

    @property
    def num_visits(self) -> int:
        return len(self.arrays["time_features"])

    @property
    def num_events(self) -> int:
        return len(self.arrays["tokens"])

    def visits_per_patient(self) -> np.ndarray:
        return np.diff(self.arrays["visit_offsets"])

    def codes_per_visit(self) -> np.ndarray:
        return np.diff(self.arrays["event_offsets"])

    def events_per_patient(self) -> np.ndarray:
        return np.diff(self.arrays["event_offsets"][self.arrays["visit_offsets"]])

    def patients_in(self, split: str | None) -> np.ndarray:
        if split is None:
            return np.arange(self.num_patients)
        names = self.header["split_names"]
        if split not in names:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self.arrays["split"] == names.index(split))

    def disk_bytes(self) -> int:
        return sum(int(a["bytes"]) for a in self.header["arrays"].values())

    def examples(self, max_visits: int, max_codes_per_visit: int) -> Any:
        """The task's examples under these maxima: equal, field by field, to `build_examples`
        over the in-memory cohort (the window's start and the first visit kept in front are
        derived here, vectorised; the rest is mapped)."""
        from ehrplan.data.examples import Examples

        if max_visits < 1 or max_codes_per_visit < 1:
            raise DataError("max_visits and max_codes_per_visit must be at least 1")
        task = self.task
        if task is None:
            raise DataError(f"{self.root}: the example cache holds no label task")
        a = self.arrays
        p, last = a["ex_patient"], a["ex_last_visit"]
        v0 = a["visit_offsets"][p]
        over = last - v0 + 1 > max_visits
        keep_first = over & (max_visits >= 2)
        recent_start = np.where(over, last - max_visits + 1 + keep_first, v0)
        return Examples(
            task=task["name"],
            kind=task["kind"],
            max_visits=max_visits,
            max_codes_per_visit=max_codes_per_visit,
            patient=p,
            last_visit=last,
            last_events=a["ex_last_events"],
            recent_start=recent_start.astype(np.int64),
            keep_first=keep_first,
            label_row=a["ex_label_row"],
            value=a["ex_value"],
            prediction_time=a["ex_prediction_time"],
            subject_id=a["ex_subject_id"],
            days=a.get("ex_days"),
            observed=a.get("ex_observed"),
            report=dict(self.header["report"]["labels"]),
        )

    def unk_share(self, cap: int | None = None) -> dict[str, Any]:
        """`ehrplan.data.vocab.unk_share` of the data encoded with the vocabulary's first
        ``cap`` tokens (all of them for None), from the tallies, without reading the tokens."""
        counts = np.asarray(self.arrays["token_counts"])
        low = np.asarray(self.arrays["code_min_id"])
        k = len(counts) if cap is None else min(cap, len(counts))
        unk = int(counts[UNK_ID]) + int(counts[k:].sum()) if k > UNK_ID else int(counts.sum())
        only = int((low >= k).sum())
        events, codes = self.num_events, len(low)
        return {
            "events": unk,
            "events_fraction": round(unk / events, 6) if events else 0.0,
            "codes": only,
            "codes_fraction": round(only / codes, 6) if codes else 0.0,
            "distinct_codes": codes,
        }


def expected_arrays(header: dict[str, Any]) -> set[str]:
    """The arrays a cache with this header holds."""
    names = set(ARRAYS) | set(TALLY_ARRAYS)
    task = header.get("task")
    if task is not None:
        names |= set(EXAMPLE_ARRAYS)
        if isinstance(task, dict) and task.get("kind") == "ckd_progression":
            names |= set(CKD_ARRAYS)
    return names


def _valid_npy(path: Path, spec: dict[str, Any]) -> bool:
    try:
        if path.stat().st_size != int(spec["bytes"]):
            return False
        with open(path, "rb") as f:
            if np.lib.format.read_magic(f) != (1, 0):
                return False
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        want = int(np.prod(shape)) * dtype.itemsize + _HEADER_BYTES
        return (
            list(shape) == list(spec["shape"])
            and dtype.name == spec["dtype"]
            and not fortran
            and want == int(spec["bytes"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def open_cache(
    path: Path, root: Path | None = None, fp: list[list[Any]] | None = None
) -> ExampleCache | None:
    """The cache at ``path`` memory-mapped, or None when it is missing or not to be trusted:
    unreadable header, another format or version, another data fingerprint, a missing,
    truncated or mis-shaped array."""
    try:
        header = json.loads((path / "header.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        return None
    if header.get("version") != VERSION:
        return None
    if fp is not None and header.get("fingerprint") != fp:
        return None
    specs = header.get("arrays")
    if not isinstance(specs, dict) or set(specs) != expected_arrays(header):
        return None
    if not all(_valid_npy(path / f"{n}.npy", s) for n, s in specs.items()):
        return None
    try:
        vocab = Vocab.load(path / "vocab.json")
    except DataError:
        return None
    if vocab_hash(vocab) != header.get("vocab_hash"):
        return None
    return ExampleCache(path=path, header=header, vocab=vocab, arrays=_map(path, specs))


class Mapped(np.memmap):
    """A cache array mapped read-only, pickled by reference: a DataLoader worker started by
    spawn (or any pickle of a dataset over the cache) maps the file again instead of copying
    its bytes. A slice or a fancy-indexed copy pickles as an ordinary array."""

    def __reduce__(self) -> Any:
        if isinstance(self.base, mmap.mmap) and self.filename is not None:  # the whole file
            return (_map_one, (self.filename, self.dtype.str, self.shape))
        return np.asarray(self).__reduce__()

    # as np.memmap does for itself: what no longer shares the mapping is a plain array
    def __array_wrap__(self, arr: Any, context: Any = None, return_scalar: bool = False) -> Any:
        arr = np.ndarray.__array_wrap__(self, arr, context)
        if self is arr:
            return arr
        return arr[()] if return_scalar else arr.view(np.ndarray)

    def __getitem__(self, index: Any) -> Any:
        res = super().__getitem__(index)
        return res.view(np.ndarray) if isinstance(res, Mapped) and res._mmap is None else res


def _map_one(path: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if 0 in shape:  # an empty file cannot be mapped
        return np.zeros(shape, dtype=dtype)
    return Mapped(path, dtype=np.dtype(dtype), mode="r", offset=_HEADER_BYTES, shape=shape)


def _map(path: Path, specs: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every array of the cache (headers checked by `_valid_npy`: `_HEADER_BYTES` each)."""
    return {
        n: _map_one(str(path / f"{n}.npy"), np.dtype(s["dtype"]).str, tuple(s["shape"]))
        for n, s in specs.items()
    }


__all__ = ["IGNORE_INDEX", "ExampleCache", "Settings", "open_cache", "prepare"]


# --------------------------------------------------------------------------------------------
# the host memory a training process needs for its data


def example_bytes(kind: str | None) -> int:
    """Bytes per example of a task of this kind (None: no task)."""
    if kind is None:
        return 0
    value = 1 if kind == "binary" else 8
    return 8 * 6 + value + (8 + 1 if kind == "ckd_progression" else 0)


def cache_bytes(
    events: int,
    visits: int,
    patients: int,
    vocab_size: int,
    *,
    examples: int = 0,
    kind: str | None = None,
    distinct_codes: int = 0,
) -> int:
    """Bytes on disk of the cache of a data set of this size (every array, headers included)."""
    token = 2 if vocab_size <= _INT16_MAX else 4
    per_visit = 8 + 8  # event offset, time features
    per_patient = 8 + 8 + 1  # visit offset, subject id, split
    n_arrays = len(ARRAYS) + len(TALLY_ARRAYS)
    if kind is not None:
        n_arrays += len(EXAMPLE_ARRAYS) + (len(CKD_ARRAYS) if kind == "ckd_progression" else 0)
    return (
        events * token
        + visits * per_visit
        + patients * per_patient
        + 16
        + vocab_size * 8
        + distinct_codes * 4
        + examples * example_bytes(kind)
        + _HEADER_BYTES * n_arrays
    )


WORKER_FORK_BYTES = 24 * 2**20
"""A forked DataLoader worker's own memory beyond the pages it shares with its parent: 15 to 21
MB of proportional set size per worker, measured on Linux at 200,000 and 52,632 patients
(small-lstm batches; `benchmarks/data_loading.py` and a fork/spawn pair run by hand)."""
WORKER_SPAWN_BASE_BYTES = 256 * 2**20
"""A spawned worker (macOS, Windows) imports Python, torch and ehrplan afresh and rebuilds its
split's arrays: 397 MiB of PSS per worker at 200,000 patients on Linux with spawn forced, of
which about 167 MiB are the split's arrays (``process_arrays``) and the rest this base."""


def worker_start_method() -> str:
    """How `ehrplan train --workers` starts its DataLoader workers: ``fork`` on Linux (they
    share the parent's pages), ``spawn`` elsewhere (macOS, where forking a process that has
    loaded Apple's frameworks is unsafe, and Windows)."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


def data_memory(
    *,
    events: int,
    visits: int,
    patients: int,
    vocab_size: int,
    batch_size: int,
    max_visits: int,
    max_codes_per_visit: int,
    workers: int = 0,
    prefetch: int = 2,
    examples: int = 0,
    kind: str | None = None,
    start_method: str | None = None,
) -> dict[str, int]:
    """Host RAM a training process needs for its data, by term (bytes).

    - ``cache_pages``: the mapped cache; an epoch touches all of it. Page cache, shared by the
      DataLoader workers and given back under pressure, but resident while training runs.
    - ``process_arrays``: what `load_training_data` and `ExampleDataset` compute in memory: per
      visit the shape temporaries of packing (prefix sums, 25 bytes), per patient the split
      name (40 bytes), per example its window start, first-visit flag, sequence and length key
      (40 bytes).
    - ``batches``: the batches alive at once, each at the largest shape (int64 codes, bool mask,
      per visit time features, stage, time, observed): one being trained plus ``prefetch`` per
      worker.
    - ``worker_processes``: each of ``workers`` DataLoader workers' own memory: forked, what it
      does not share with its parent (`WORKER_FORK_BYTES`); spawned, an interpreter with torch
      (`WORKER_SPAWN_BASE_BYTES`) plus its own copy of the split's arrays. ``start_method``:
      ``fork`` or ``spawn`` (default: this platform's, `worker_start_method`).
    """
    pages = cache_bytes(events, visits, patients, vocab_size, examples=examples, kind=kind)
    arrays = visits * 25 + patients * 40 + examples * 40
    one = batch_size * max_visits * (max_codes_per_visit * 9 + 8 + 8 + 4 + 1)
    batches = one * (1 + workers * prefetch)
    method = start_method or worker_start_method()
    each = WORKER_FORK_BYTES if method == "fork" else WORKER_SPAWN_BASE_BYTES + arrays
    procs = workers * each
    return {
        "cache_pages": pages,
        "process_arrays": arrays,
        "batches": batches,
        "worker_processes": procs,
        "total": pages + arrays + batches + procs,
    }
