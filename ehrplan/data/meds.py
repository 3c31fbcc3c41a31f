"""Reading, checking and writing MEDS data sets with pyarrow (no pandas, no torch).

The schema is that of the `meds` package (v0.4, `meds.schema`, Medical-Event-Data-Standard/meds):

- ``$ROOT/data/**/*.parquet`` (`DataSchema`): ``subject_id`` int64 (not null), ``time``
  timestamp[us] (null only for static events), ``code`` string (not null), ``numeric_value``
  float32 (nullable, optional); extra columns allowed. Each subject lives in exactly one file, its
  rows contiguous and sorted by time.
- ``$ROOT/metadata/codes.parquet`` (`CodeMetadataSchema`): ``code``, ``description``,
  ``parent_codes`` (list of strings).
- ``$ROOT/metadata/subject_splits.parquet`` (`SubjectSplitSchema`): ``subject_id``, ``split``
  (``train`` / ``tuning`` / ``held_out``).
- ``$ROOT/metadata/dataset.json`` (`DatasetMetadataSchema`, all fields optional).
- Task labels (`LabelSchema`, closed): ``$TASK_ROOT/$TASK_NAME/**/*.parquet`` with ``subject_id``,
  ``prediction_time`` and optional ``boolean_value``, ``integer_value``, ``float_value``,
  ``categorical_value``.

The reader is lenient where a cast is lossless (any integer ``subject_id``, any timestamp unit,
``large_string`` or dictionary codes, float64 values) and strict otherwise: every problem is a
`DataError` whose one-line message names the file and the problem. The `meds` package itself is
used only by the tests, to check what `ehrplan synth` writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ehrplan.atomic import atomic_path
from ehrplan.errors import DataError

DATA_DIR = "data"
CODES_FILE = Path("metadata") / "codes.parquet"
SPLITS_FILE = Path("metadata") / "subject_splits.parquet"
DATASET_FILE = Path("metadata") / "dataset.json"
MEDS_VERSION = "0.4.1"  # the `meds` package version whose schema we write and test against
SPLITS: tuple[str, ...] = ("train", "tuning", "held_out")

DATA_SCHEMA = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("time", pa.timestamp("us")),
        pa.field("code", pa.string(), nullable=False),
        pa.field("numeric_value", pa.float32()),
    ]
)
LABEL_VALUE_TYPES: dict[str, pa.DataType] = {
    "boolean_value": pa.bool_(),
    "integer_value": pa.int64(),
    "float_value": pa.float32(),
    "categorical_value": pa.string(),
}
NULL_TIME = np.iinfo(np.int64).min  # stands in for a null (static) time when sorting


@dataclass(frozen=True)
class Events:
    """Every event of a data set, in file order: subjects contiguous, each sorted by time."""

    subject_id: np.ndarray
    """int64 [E]."""
    time: np.ndarray
    """int64 [E]: microseconds since the epoch; `NULL_TIME` for a static (null-time) event."""
    code: pa.Array
    """string [E]."""
    numeric_value: np.ndarray
    """float32 [E]: NaN where the event has no value."""
    files: tuple[str, ...]
    """The data files read, relative to the root."""

    def __len__(self) -> int:
        return len(self.subject_id)


# --------------------------------------------------------------------------------------------
# checks


def check_root(root: str | Path) -> Path:
    """The root of a MEDS data set, or a `DataError` saying why the directory is not one."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such directory")
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected a MEDS data set)")
    if not (root / DATA_DIR).is_dir():
        raise DataError(
            f"{root}: not a MEDS data set (no '{DATA_DIR}/' directory of parquet files)"
        )
    return root


def data_files(root: Path) -> list[Path]:
    """``data/**/*.parquet``, sorted, as the MEDS glob says."""
    files = sorted(p for p in (root / DATA_DIR).rglob("*.parquet") if p.is_file())
    if not files:
        raise DataError(f"{root / DATA_DIR}: no parquet files (empty MEDS data set)")
    return files


def _read_table(
    path: Path, columns: list[str] | None = None, read_dictionary: list[str] | None = None
) -> pa.Table:
    try:
        # ParquetFile, not read_table: read_table imports pyarrow.dataset and pandas (0.2 s)
        with pq.ParquetFile(path, read_dictionary=read_dictionary) as f:
            return f.read(columns=columns)
    except (pa.ArrowInvalid, OSError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: not a readable parquet file ({msg})") from None


def _read_schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: not a readable parquet file ({msg})") from None


def _int64_ids(path: Path, col: Any, name: str = "subject_id") -> np.ndarray:
    """An integer id column as int64; ids beyond int64 (uint64 files) are one `DataError`."""
    try:
        return col.cast(pa.int64()).to_numpy()
    except (pa.ArrowInvalid, OverflowError) as err:
        msg = str(err).splitlines()[0]
        raise DataError(f"{path}: column '{name}' does not fit int64 ({msg})") from None


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _check_column(
    path: Path, schema: pa.Schema, name: str, ok: Any, expected: str, required: bool = True
) -> bool:
    """Whether ``name`` is present; raises if it is required and missing, or mistyped."""
    if name not in schema.names:
        if required:
            raise DataError(
                f"{path}: missing column '{name}' (MEDS needs {expected}; "
                f"found: {', '.join(schema.names) or 'none'})"
            )
        return False
    t = schema.field(name).type
    if not ok(t):
        raise DataError(f"{path}: column '{name}' has type {t}, expected {expected}")
    return True


def _time_us(path: Path, col: pa.ChunkedArray | pa.Array, name: str) -> np.ndarray:
    """Timestamps of any unit as int64 microseconds; nulls become `NULL_TIME`.

    A time zone is dropped (the UTC instant is kept); nanoseconds are truncated to
    microseconds (a division, which cannot overflow); seconds and milliseconds are cast safely.
    """
    t = col.type
    try:
        col = pc.cast(col, pa.timestamp(t.unit), safe=True)  # drop the zone: UTC wall time
        col = pc.cast(col, pa.timestamp("us"), safe=t.unit != "ns")
    except pa.ArrowInvalid as err:
        raise DataError(f"{path}: column '{name}' does not fit timestamp[us] ({err})") from None
    return pc.fill_null(col.cast(pa.int64()), NULL_TIME).to_numpy()


def _no_nulls(path: Path, table: pa.Table, names: list[str]) -> None:
    for name in names:
        n = table.column(name).null_count
        if n:
            raise DataError(
                f"{path}: column '{name}' has {n} null value(s); MEDS forbids nulls there"
            )


def read_events(root: str | Path) -> Events:
    """Read and check every data file of a MEDS data set.

    Checks, each a one-line `DataError` naming the file: required columns present and of MEDS
    types; no null ``subject_id``/``code``; each subject's rows contiguous and sorted by time
    (static null-time rows first); each subject in one file only; at least one event.
    """
    root = check_root(root)
    files = data_files(root)
    sids, times, codes, values, uniq = [], [], [], [], []
    read: list[Path] = []  # the files with rows, parallel to the lists above
    for path in files:
        got = read_data_file(path)
        if got is None:
            continue
        sid, t, code, value = got
        sids.append(sid)
        times.append(t)
        codes.append(code)
        values.append(value)
        uniq.append(np.unique(sid))
        read.append(path)
    if not sids:
        raise DataError(f"{root / DATA_DIR}: no events in {len(files)} parquet file(s)")
    _check_one_file_per_subject(root, read, uniq, sids, times)
    return Events(
        subject_id=np.concatenate(sids),
        time=np.concatenate(times),
        code=pa.concat_arrays(codes),
        numeric_value=np.concatenate(values),
        files=tuple(str(p.relative_to(root)) for p in files),
    )


def read_data_file(
    path: Path, *, dictionary: bool = False
) -> tuple[np.ndarray, np.ndarray, pa.Array, np.ndarray] | None:
    """One data file's checked events: subject_id, time (`NULL_TIME` for null), code and
    numeric_value (NaN for null); None when it has no rows. Checks as `read_events`, except
    that a subject may be in one file only, which needs every file. ``dictionary``: the codes
    as one dictionary array (each distinct code once, then int32 indices), read 3x faster."""
    schema = _read_schema(path)
    _check_column(path, schema, "subject_id", pa.types.is_integer, "int64 subject_id")
    _check_column(path, schema, "time", pa.types.is_timestamp, "timestamp[us] time")
    _check_column(path, schema, "code", _is_string, "string code")
    has_value = _check_column(
        path,
        schema,
        "numeric_value",
        lambda t: pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_null(t),
        "float32 numeric_value",
        required=False,
    )
    cols = ["subject_id", "time", "code"] + (["numeric_value"] if has_value else [])
    table = _read_table(path, cols, ["code"] if dictionary else None)
    if table.num_rows == 0:
        return None
    _no_nulls(path, table, ["subject_id", "code"])
    sid = _int64_ids(path, table.column("subject_id"))
    t = _time_us(path, table.column("time"), "time")
    _check_order(path, sid, t)
    if dictionary and pa.types.is_dictionary(table.schema.field("code").type):
        code = table.unify_dictionaries().column("code").combine_chunks()
    else:
        code = table.column("code").cast(pa.string()).combine_chunks()
    if has_value:
        v = table.column("numeric_value").cast(pa.float32())
        value = pc.fill_null(v, float("nan")).to_numpy().astype(np.float32)
    else:
        value = np.full(table.num_rows, np.nan, dtype=np.float32)
    return sid, t, code, value


def _check_order(path: Path, sid: np.ndarray, t: np.ndarray) -> None:
    """Each subject's rows contiguous and sorted by time, static (null-time) rows first."""
    change = sid[1:] != sid[:-1]
    runs = int(change.sum()) + 1
    if runs != len(np.unique(sid)):
        starts = np.concatenate([[0], np.flatnonzero(change) + 1])
        seen, dup = set(), None
        for s in sid[starts]:
            if s in seen:
                dup = int(s)
                break
            seen.add(s)
        raise DataError(
            f"{path}: rows of subject {dup} are not contiguous (MEDS keeps them together)"
        )
    bad = np.flatnonzero(~change & (t[1:] < t[:-1]))
    if len(bad):
        i = int(bad[0]) + 1
        raise DataError(
            f"{path}: subject {int(sid[i])} is out of time order at row {i} "
            "(MEDS sorts each subject's events by time, static null-time events first)"
        )


def _check_one_file_per_subject(
    root: Path,
    files: list[Path],
    uniq: list[np.ndarray],
    sids: list[np.ndarray],
    times: list[np.ndarray],
) -> None:
    all_u = np.concatenate(uniq)
    u, counts = np.unique(all_u, return_counts=True)
    if not (counts > 1).any():
        return
    s = int(u[np.flatnonzero(counts > 1)[0]])
    where = [i for i, x in enumerate(uniq) if np.isin(s, x)]
    a, b = where[0], where[1]
    ta = times[a][sids[a] == s]
    tb = times[b][sids[b] == s]
    order = " and out of time order" if tb.min() < ta.max() else ""
    raise DataError(
        f"{files[b]}: subject {s} is split across {files[a].relative_to(root)} and "
        f"{files[b].relative_to(root)}{order} (MEDS keeps each subject in one file)"
    )


def read_splits(root: str | Path) -> dict[int, str] | None:
    """``metadata/subject_splits.parquet`` as {subject_id: split}, or None when it is absent."""
    path = Path(root) / SPLITS_FILE
    if not path.exists():
        return None
    schema = _read_schema(path)
    _check_column(path, schema, "subject_id", pa.types.is_integer, "int64 subject_id")
    _check_column(path, schema, "split", _is_string, "string split")
    table = _read_table(path, ["subject_id", "split"])
    _no_nulls(path, table, ["subject_id", "split"])
    sid = _int64_ids(path, table.column("subject_id")).tolist()
    split = table.column("split").cast(pa.string()).to_pylist()
    return dict(zip(sid, split, strict=True))


def train_patients(root: str | Path) -> int:
    """The patients of the train split (``metadata/subject_splits.parquet``): one epoch, for the
    time rule of `ehrplan recommend --data` and `ehrplan train --auto --data`."""
    splits = read_splits(root)
    if splits is None:
        raise DataError(f"--data {root}: no {SPLITS_FILE}; give --patients")
    n = sum(1 for s in splits.values() if s == "train")
    if n == 0:
        raise DataError(f"--data {root}: the train split has no patients")
    return n


@dataclass(frozen=True)
class Labels:
    """One task's label rows, sorted as read (any order)."""

    subject_id: np.ndarray
    """int64 [L]."""
    prediction_time: np.ndarray
    """int64 [L]: microseconds since the epoch."""
    values: dict[str, np.ndarray]
    """The optional value columns present: boolean_value, integer_value, float_value."""
    files: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.subject_id)


def label_files(path: str | Path) -> list[Path]:
    """A label file, or every ``**/*.parquet`` under a task directory."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such label file or task directory")
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if not files:
        raise DataError(f"{path}: no label parquet files")
    return files


def read_labels(path: str | Path, known_subjects: np.ndarray | None = None) -> Labels:
    """Read a task's label files (`LabelSchema`); subjects must exist in ``known_subjects``."""
    files = label_files(path)
    sids, times = [], []
    vals: dict[str, list[np.ndarray]] = {}
    present: set[str] | None = None
    for f in files:
        schema = _read_schema(f)
        _check_column(f, schema, "subject_id", pa.types.is_integer, "int64 subject_id")
        _check_column(
            f, schema, "prediction_time", pa.types.is_timestamp, "timestamp[us] prediction_time"
        )
        cols = [c for c in LABEL_VALUE_TYPES if c in schema.names]
        for c in cols:
            want = LABEL_VALUE_TYPES[c]
            t = schema.field(c).type
            ok = {
                "boolean_value": pa.types.is_boolean,
                "integer_value": pa.types.is_integer,
                "float_value": lambda x: pa.types.is_floating(x) or pa.types.is_integer(x),
                "categorical_value": _is_string,
            }[c](t)
            if not ok:
                raise DataError(f"{f}: column '{c}' has type {t}, expected {want}")
        if present is not None and set(cols) != present:
            raise DataError(f"{f}: label columns {sorted(cols)} differ from {sorted(present)}")
        present = set(cols)
        table = _read_table(f, ["subject_id", "prediction_time", *cols])
        _no_nulls(f, table, ["subject_id", "prediction_time", *cols])
        sid = _int64_ids(f, table.column("subject_id"))
        if known_subjects is not None and len(sid):
            unknown = ~np.isin(sid, known_subjects)
            if unknown.any():
                ex = ", ".join(str(int(s)) for s in np.unique(sid[unknown])[:3])
                raise DataError(
                    f"{f}: {int(unknown.sum())} label row(s) for subjects not in the data "
                    f"(e.g. subject {ex})"
                )
        sids.append(sid)
        times.append(_time_us(f, table.column("prediction_time"), "prediction_time"))
        for c in cols:
            if c == "categorical_value":
                continue
            arr = table.column(c)
            if c == "float_value":
                arr = arr.cast(pa.float32())
            if c == "integer_value":
                arr = arr.cast(pa.int64())
            vals.setdefault(c, []).append(arr.to_numpy(zero_copy_only=False))
    n = sum(len(s) for s in sids)
    if n == 0:
        raise DataError(f"{path}: label files hold no rows")
    return Labels(
        subject_id=np.concatenate(sids),
        prediction_time=np.concatenate(times),
        values={c: np.concatenate(v) for c, v in vals.items()},
        files=tuple(str(f) for f in files),
    )


FINGERPRINT_WHOLE = 16 * 2**20  # files up to this size are hashed whole
FINGERPRINT_PART = 4 * 2**20  # larger ones: their size, first and last 4 MiB


def fingerprint(root: str | Path) -> str:
    """A short hash of a data set's content: every file under ``data/``, ``metadata/`` and
    ``tasks/`` (relative path, size, bytes; a file over 16 MiB by its first and last 4 MiB).

    The same data set in another folder has the same fingerprint; another data set (other
    patients, other labels, another split) has another. `ehrplan train --resume` compares it
    with the one its run recorded.
    """
    import hashlib

    root = Path(root)
    h = hashlib.sha256()
    for top in (DATA_DIR, "metadata", "tasks"):
        for f in sorted((root / top).rglob("*")):
            if not f.is_file() or any(part.startswith(".") for part in f.relative_to(root).parts):
                continue
            size = f.stat().st_size
            h.update(f"{f.relative_to(root).as_posix()}\0{size}\0".encode())
            with f.open("rb") as fh:
                if size <= FINGERPRINT_WHOLE:
                    h.update(fh.read())
                else:
                    h.update(fh.read(FINGERPRINT_PART))
                    fh.seek(size - FINGERPRINT_PART)
                    h.update(fh.read(FINGERPRINT_PART))
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# writing (atomic: a temp file in the same directory, then os.replace)


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write one parquet file atomically. Deterministic bytes for the same table and pyarrow."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def codes_table(codes: list[str], descriptions: Mapping[str, str]) -> pa.Table:
    """``metadata/codes.parquet``: every code of the data, a description, its parent codes."""
    parents = [[c.replace("//", "/", 1)] if "//" in c else [] for c in codes]
    return pa.table(
        {
            "code": pa.array(codes, pa.string()),
            "description": pa.array([descriptions.get(c) for c in codes], pa.string()),
            "parent_codes": pa.array(parents, pa.list_(pa.string())),
        }
    )


def splits_table(subject_ids: np.ndarray, splits: list[str]) -> pa.Table:
    """``metadata/subject_splits.parquet``."""
    schema = pa.schema(
        [
            pa.field("subject_id", pa.int64(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
        ]
    )
    return pa.table({"subject_id": subject_ids, "split": splits}, schema=schema)
