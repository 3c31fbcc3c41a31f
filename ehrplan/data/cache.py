"""The example cache: a MEDS data set's training examples as memory-mapped arrays (no torch).

`prepare` reads the data files one at a time, twice: a first pass counts the train split's
tokens for the vocabulary (`VocabCounter`; skipped when a vocabulary is given), a second groups
each file's events into visits, joins its subjects' labels and writes token ids. Peak memory is
one file's events, the label rows and the vocabulary pass's lab values (4 bytes each), never the
whole data set.

Layout, under ``$EHRPLAN_CACHE/examples/<key>/`` (the data folder may be read-only):

- ``header.json``: format, version, the data fingerprint (every data, label and split file's
  relative name, size and mtime), the vocabulary hash, task, visit window, counts, and each
  array's dtype, shape and byte size.
- ``vocab.json``: the vocabulary the token ids index (`Vocab`).
- one ``.npy`` per array: ``tokens`` (int16 when the vocabulary fits, else int32) [E],
  ``event_offsets`` [V+1] and ``visit_offsets`` [P+1] (int64), per visit ``visit_end``
  (int64 microseconds), ``time_features`` (float32 [V, 2]), ``stage`` (int32, -100 unlabelled),
  ``time_to_event`` (float32), ``event_observed`` (bool), per patient ``subject_ids`` (int64)
  and ``split`` (int8 index into the header's split names).

The key hashes the fingerprint with the build settings, so a changed data set or vocabulary
gets a new cache. A cache is built in a temporary folder beside its final place and renamed at
the end: a build killed at any moment leaves the old cache or none. `open_cache` checks the
header against the data and every array's size and npy header; anything off (truncated,
corrupt, another format version, changed data) is rebuilt, never read. A full disk stops the
build with one line naming the path.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa

from ehrplan.atomic import ensure_dir, output_error
from ehrplan.data import meds
from ehrplan.data.cohort import (
    DEFAULT_TASK,
    DEFAULT_WINDOW_HOURS,
    IGNORE_INDEX,
    _fill_static_times,
    attach_label_rows,
    build_cohort,
)
from ehrplan.data.vocab import DEFAULT_MIN_COUNT, DEFAULT_VALUE_BINS, Vocab, VocabCounter
from ehrplan.errors import DataError, OutputError

FORMAT = "ehrplan-example-cache"
VERSION = 1
CACHE_ENV = "EHRPLAN_CACHE"
_HEADER_BYTES = 128  # every .npy header is padded to this, so the shape can be set at the end
_INT16_MAX = np.iinfo(np.int16).max

ARRAYS: dict[str, tuple[str, tuple[int, ...]]] = {
    # name: (dtype, trailing shape); tokens' dtype is chosen by the vocabulary's size
    "tokens": ("int16", ()),
    "event_offsets": ("int64", ()),
    "visit_offsets": ("int64", ()),
    "visit_end": ("int64", ()),
    "time_features": ("float32", (2,)),
    "stage": ("int32", ()),
    "time_to_event": ("float32", ()),
    "event_observed": ("bool", ()),
    "subject_ids": ("int64", ()),
    "split": ("int8", ()),
}


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
    """The label task folder or file; None: ``tasks/ckd_stage`` when present."""
    window_hours: float = DEFAULT_WINDOW_HOURS
    min_count: int = DEFAULT_MIN_COUNT
    value_bins: int = DEFAULT_VALUE_BINS
    vocab: str | None = None
    """The hash of a given vocabulary (a resumed run's); None: built on the train split."""

    def label_path(self, root: Path) -> Path | None:
        path = Path(self.task) if self.task is not None else root / DEFAULT_TASK
        return path if self.task is not None or path.exists() else None


def cache_key(root: Path, settings: Settings) -> tuple[str, list[list[Any]]]:
    fp = fingerprint(root, settings.label_path(root))
    doc = {"root": str(root.absolute()), "files": fp, "settings": settings.__dict__}
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    return digest[:20], fp


# --------------------------------------------------------------------------------------------
# writing


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 .npy header padded to `_HEADER_BYTES` (the shape can grow in place)."""
    d = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    text = repr(d).encode("latin1")
    pad = _HEADER_BYTES - 10 - len(text) - 1
    return (
        b"\x93NUMPY\x01\x00"
        + (_HEADER_BYTES - 10).to_bytes(2, "little")
        + text
        + (b" " * pad)
        + b"\n"
    )


class _Appender:
    """One .npy file written row block by row block; its header gets the final shape at the end."""

    def __init__(self, path: Path, dtype: str, tail: tuple[int, ...]) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.tail = tail
        self.rows = 0
        self.f: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.f.write(_npy_header(self.dtype, (0, *tail)))

    def add(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=self.dtype)
        self.f.write(a.tobytes())
        self.rows += len(a)

    def close(self) -> dict[str, Any]:
        shape = (self.rows, *self.tail)
        self.f.seek(0)
        self.f.write(_npy_header(self.dtype, shape))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {
            "dtype": self.dtype.name,
            "shape": list(shape),
            "bytes": self.path.stat().st_size,
        }


def _splits_array(root: Path) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """The splits file as sorted subject ids, split codes and the split names."""
    m = meds.read_splits(root)
    if m is None:
        return None
    sid = np.fromiter(m.keys(), dtype=np.int64, count=len(m))
    names = sorted(set(m.values()))
    code = np.array([names.index(s) for s in m.values()], dtype=np.int8)
    order = np.argsort(sid)
    return sid[order], code[order], names


def _label_subset(lab: meds.Labels, order: np.ndarray, subjects: np.ndarray) -> meds.Labels:
    """The label rows of the given subjects (``order`` sorts the labels by subject)."""
    sorted_sid = lab.subject_id[order]
    lo = np.searchsorted(sorted_sid, subjects, side="left")
    hi = np.searchsorted(sorted_sid, subjects, side="right")
    n = hi - lo
    idx = order[np.repeat(lo, n) + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))]
    idx = np.sort(idx)  # file order, as the whole-data join sees them
    return meds.Labels(
        subject_id=lab.subject_id[idx],
        prediction_time=lab.prediction_time[idx],
        values={k: v[idx] for k, v in lab.values.items()},
        files=lab.files,
    )


def _vocab_pass(
    files: list[Path], splits: tuple[np.ndarray, np.ndarray, list[str]] | None, settings: Settings
) -> Vocab:
    counter = VocabCounter()
    for path in files:
        got = meds.read_data_file(path, dictionary=True)
        if got is None:
            continue
        sid, t, code, value = got
        _, keep = _fill_static_times(sid, t)
        if splits is None:
            train = keep
        else:
            sorted_sid, split_code, names = splits
            pos = np.minimum(np.searchsorted(sorted_sid, sid), len(sorted_sid) - 1)
            listed = sorted_sid[pos] == sid
            want = names.index("train") if "train" in names else -1
            train = keep & listed & (split_code[pos] == want)
        counter.add(code.filter(pa.array(train)), value[train])
    return counter.vocab(min_count=settings.min_count, value_bins=settings.value_bins)


def _build(root: Path, tmp: Path, settings: Settings, vocab: Vocab | None) -> dict[str, Any]:
    files = meds.data_files(root)
    splits = _splits_array(root)
    label_path = settings.label_path(root)
    lab = meds.read_labels(label_path) if label_path is not None else None
    lab_order = np.argsort(lab.subject_id, kind="stable") if lab is not None else None
    if vocab is None:
        vocab = _vocab_pass(files, splits, settings)
    vocab.save(tmp / "vocab.json")
    token_dtype = "int16" if len(vocab) <= _INT16_MAX else "int32"
    out = {
        name: _Appender(tmp / f"{name}.npy", token_dtype if name == "tokens" else dt, tail)
        for name, (dt, tail) in ARRAYS.items()
    }
    split_map = None
    if splits is not None:
        names = splits[2]
        split_map = dict(zip(splits[0].tolist(), (names[c] for c in splits[1]), strict=True))
    # no splits file: build_cohort splits by a hash of subject_id into the three splits
    split_names = (
        sorted(set(split_map.values()))
        if split_map is not None
        else ["held_out", "train", "tuning"]
    )
    split_idx = {s: i for i, s in enumerate(split_names)}
    report: dict[str, int] = {}
    seen: list[np.ndarray] = []
    events = visits = patients = 0
    out["event_offsets"].add(np.zeros(1, np.int64))
    out["visit_offsets"].add(np.zeros(1, np.int64))
    read_any = False
    token_id = vocab.token_to_id
    for path in files:
        got = meds.read_data_file(path, dictionary=True)
        if got is None:
            continue
        sid, t, code, value = got
        uniq = sid[np.flatnonzero(np.diff(sid, prepend=sid[0] - 1))]  # contiguous, checked
        seen.append(uniq)
        if not (t != meds.NULL_TIME).any():
            report["static_only_events_dropped"] = report.get(
                "static_only_events_dropped", 0
            ) + len(sid)
            continue
        c = build_cohort(
            str(root), sid, t, code, value, split_map=split_map, window_hours=settings.window_hours
        )
        if lab is not None and lab_order is not None:
            attach_label_rows(c, _label_subset(lab, lab_order, c.subject_ids), label_path)
        for k, n in c.report.items():
            report[k] = report.get(k, 0) + n
        if pa.types.is_dictionary(c.code.type):
            ids = vocab.encode_dictionary(c.code, c.numeric_value, token_id)
        else:
            ids = vocab.encode(c.code, c.numeric_value)
        out["tokens"].add(ids)
        out["event_offsets"].add(c.event_offsets[1:] + events)
        out["visit_offsets"].add(c.visit_offsets[1:] + visits)
        out["visit_end"].add(c.visit_end)
        out["time_features"].add(c.time_features)
        out["stage"].add(c.stage)
        out["time_to_event"].add(c.time_to_event)
        out["event_observed"].add(c.event_observed)
        out["subject_ids"].add(c.subject_ids)
        out["split"].add(np.array([split_idx.get(s, -1) for s in c.split], dtype=np.int8))
        events += c.num_events
        visits += c.num_visits
        patients += c.num_patients
        read_any = True
    if not read_any:
        raise DataError(f"{root / meds.DATA_DIR}: no timed events in {len(files)} file(s)")
    all_sid = np.concatenate(seen)
    if len(np.unique(all_sid)) != len(all_sid):
        meds.read_events(root)  # names the file and subject split across files
    if lab is not None:
        unknown = ~np.isin(lab.subject_id, all_sid)
        if unknown.any():
            ex = ", ".join(str(int(s)) for s in np.unique(lab.subject_id[unknown])[:3])
            raise DataError(
                f"{label_path}: {int(unknown.sum())} label row(s) for subjects not in the data "
                f"(e.g. subject {ex})"
            )
    arrays = {name: a.close() for name, a in out.items()}
    return {
        "vocab_hash": vocab_hash(vocab),
        "vocab_size": len(vocab),
        "split_names": split_names,
        "counts": {"patients": patients, "visits": visits, "events": events},
        "label_files": list(lab.files) if lab is not None else [],
        "report": report,
        "arrays": arrays,
    }


def prepare(
    root: str | Path, settings: Settings | None = None, vocab: Vocab | None = None
) -> ExampleCache:
    """The cache of ``root``: opened when valid, otherwise built (atomically) and opened."""
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
        body = _build(root, tmp, settings, vocab)
        header = {
            "format": FORMAT,
            "version": VERSION,
            "data": str(root.absolute()),
            "fingerprint": fp,
            "settings": settings.__dict__,
            "task": str(settings.label_path(root)) if settings.label_path(root) else None,
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
    """A built cache, its arrays memory-mapped: the attributes `EHRDataset` and the truncation
    and shape counts read from a `Cohort`, plus ``tokens``."""

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
        return dict(self.header["report"])

    @property
    def label_files(self) -> tuple[str, ...]:
        return tuple(self.header["label_files"])

    @property
    def split(self) -> np.ndarray:
        names = np.array([*self.header["split_names"], ""], dtype=object)
        return names[self.arrays["split"]]  # -1 (unlisted) -> ""

    @property
    def num_patients(self) -> int:
        return len(self.arrays["subject_ids"])

    @property
    def num_visits(self) -> int:
        return len(self.arrays["visit_end"])

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
    if not isinstance(specs, dict) or set(specs) != set(ARRAYS):
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


def _map(path: Path, specs: dict[str, Any]) -> dict[str, np.ndarray]:
    return {n: np.load(path / f"{n}.npy", mmap_mode="r") for n in specs}


__all__ = ["IGNORE_INDEX", "ExampleCache", "Settings", "open_cache", "prepare"]


# --------------------------------------------------------------------------------------------
# the host memory a training process needs for its data


def cache_bytes(events: int, visits: int, patients: int, vocab_size: int) -> int:
    """Bytes on disk of the cache of a data set of this size (`ARRAYS`, headers included)."""
    token = 2 if vocab_size <= _INT16_MAX else 4
    per_visit = 8 + 8 + 8 + 4 + 4 + 1  # event offset, end, time features, stage, time, observed
    per_patient = 8 + 8 + 1  # visit offset, subject id, split
    return (
        events * token
        + visits * per_visit
        + patients * per_patient
        + 16
        + _HEADER_BYTES * len(ARRAYS)
    )


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
) -> dict[str, int]:
    """Host RAM a training process needs for its data, by term (bytes).

    - ``cache_pages``: the mapped cache; an epoch touches all of it. Page cache, shared by the
      DataLoader workers and given back under pressure, but resident while training runs.
    - ``process_arrays``: what `load_training_data` and `EHRDataset` compute in memory: per
      visit a label mask, kept-visit mask and the shape temporaries (25 bytes), per patient the
      split name, length keys and shapes (40 bytes).
    - ``batches``: the batches alive at once, each at the largest shape (int64 codes, bool mask,
      per visit time features, stage, time, observed): one being trained plus ``prefetch`` per
      worker.
    Worker processes are forked and share the parent's pages; their own interpreter overhead is
    not counted here.
    """
    pages = cache_bytes(events, visits, patients, vocab_size)
    arrays = visits * 25 + patients * 40
    one = batch_size * max_visits * (max_codes_per_visit * 9 + 8 + 8 + 4 + 1)
    batches = one * (1 + workers * prefetch)
    return {
        "cache_pages": pages,
        "process_arrays": arrays,
        "batches": batches,
        "total": pages + arrays + batches,
    }
