"""Label tasks: which task a command means, and what kind of label its files hold (no torch).

Finding the task (`resolve_task`): ``--labels PATH`` is a task folder or one label file anywhere;
``--task NAME`` is ``ROOT/tasks/NAME/**/*.parquet``; with neither, the data set's only task (the
synthetic cohort's ``ckd_stage``). Several tasks and no choice, or a name that is not there, is a
one-line `DataError` listing the tasks found.

The kind of a task comes from the MEDS ``LabelSchema`` value columns that are *filled*; a file may
carry the unused ones all null, as the field's label extractors write them:

- ``boolean_value`` -> ``binary`` (one logit);
- ``integer_value`` -> ``multiclass`` (classes 0..K-1);
- ``float_value`` -> ``regression``;
- ``integer_value`` + ``float_value`` + ``boolean_value`` on every row -> ``ckd_progression``, the
  composite `ehrplan synth` writes: stage, days to the next stage change, whether it was seen.

Per row exactly one value column is filled (or all three of the composite); every file of a task
has the same kind. ``categorical_value`` is not trained on (map it to integers first). Each
violation is one line naming the file and how many rows break the rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from ehrplan.data import meds
from ehrplan.errors import DataError

TASKS_DIR = "tasks"
TaskKind = Literal["binary", "multiclass", "regression", "ckd_progression"]
KINDS: tuple[str, ...] = ("binary", "multiclass", "regression", "ckd_progression")
_COMPOSITE = ("integer_value", "float_value", "boolean_value")
_SINGLE: dict[str, TaskKind] = {
    "boolean_value": "binary",
    "integer_value": "multiclass",
    "float_value": "regression",
}
_TYPE_OK = {
    "boolean_value": pa.types.is_boolean,
    "integer_value": pa.types.is_integer,
    "float_value": lambda t: pa.types.is_floating(t) or pa.types.is_integer(t),
    "categorical_value": meds._is_string,
}


@dataclass(frozen=True)
class DataRequest:
    """Which task of a data set, and how to read it (the command line's data options)."""

    task: str | None = None
    labels: Path | None = None
    splits: str | None = None
    """``train=NAME,tuning=NAME,held_out=NAME``: the split names of the data's splits file."""
    min_code_count: int | None = None


@dataclass(frozen=True)
class TaskSource:
    """Where a task's label files are, and the name it goes by."""

    name: str
    path: Path


@dataclass(frozen=True)
class TaskLabels:
    """One task's label rows (in file order) and their kind.

    ``value`` holds the label of each row: bool (binary), int64 (multiclass and the composite's
    stage) or float64 (regression). The composite also fills ``days`` (float64, >= 0) and
    ``observed`` (bool)."""

    name: str
    kind: TaskKind
    subject_id: np.ndarray
    """int64 [L]."""
    prediction_time: np.ndarray
    """int64 [L]: microseconds since the epoch."""
    value: np.ndarray
    files: tuple[str, ...]
    days: np.ndarray | None = None
    observed: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.subject_id)


def find_tasks(root: str | Path) -> list[str]:
    """The task names under ``ROOT/tasks/``: its folders that hold a parquet file somewhere."""
    base = Path(root) / TASKS_DIR
    if not base.is_dir():
        return []
    return sorted(d.name for d in base.iterdir() if d.is_dir() and any(d.rglob("*.parquet")))


def resolve_task(
    root: str | Path, task: str | None = None, labels: str | Path | None = None
) -> TaskSource:
    """The task a command means (see the module docstring)."""
    root = Path(root)
    if task is not None and labels is not None:
        raise DataError("give --task NAME or --labels PATH, not both")
    if labels is not None:
        p = Path(labels)
        if not p.exists():
            raise DataError(f"--labels {p}: no such label file or task folder")
        return TaskSource(name=p.stem if p.is_file() else p.name, path=p)
    found = find_tasks(root)
    listed = ", ".join(found) if found else "none"
    if task is not None:
        p = root / TASKS_DIR / task
        if not p.is_dir() or not any(p.rglob("*.parquet")):
            raise DataError(f"{root}: no task '{task}' in {TASKS_DIR}/ (tasks found: {listed})")
        return TaskSource(name=task, path=p)
    if not found:
        raise DataError(
            f"{root}: no labels (no label task in {TASKS_DIR}/NAME/*.parquet); give --labels PATH"
        )
    if len(found) > 1:
        raise DataError(f"{root}: {len(found)} tasks ({listed}); choose one with --task NAME")
    return TaskSource(name=found[0], path=root / TASKS_DIR / found[0])


def _file_kind(f: Path, table: pa.Table, cols: list[str]) -> TaskKind:
    """The kind of one file's rows, from which value columns are filled."""
    n = table.num_rows
    filled = {c: np.asarray(table.column(c).is_valid()) for c in cols}
    if all(c in filled for c in _COMPOSITE) and all(filled[c].all() for c in _COMPOSITE):
        return "ckd_progression"
    count = sum((m.astype(np.int64) for m in filled.values()), np.zeros(n, dtype=np.int64))
    bad = int((count != 1).sum())
    if bad:
        none = int((count == 0).sum())
        what = "no value column filled" if none == bad else "more than one value column filled"
        raise DataError(
            f"{f}: {bad} of {n} label row(s) with {what} (each row needs exactly one of "
            "boolean_value, integer_value, float_value)"
        )
    kinds = [c for c, m in filled.items() if m.any()]
    if len(kinds) > 1:
        raise DataError(
            f"{f}: label rows of mixed kinds ({', '.join(kinds)} each filled on some rows); "
            "one task has one kind"
        )
    if kinds[0] == "categorical_value":
        raise DataError(
            f"{f}: categorical_value labels are not supported (map them to integer_value classes)"
        )
    return _SINGLE[kinds[0]]


def read_task(source: TaskSource) -> TaskLabels:
    """Read and check a task's label files; every problem is one line naming the file."""
    files = meds.label_files(source.path)
    sids, times, values, days, observed = [], [], [], [], []
    kind: TaskKind | None = None
    first: Path | None = None
    for f in files:
        schema = meds._read_schema(f)
        meds._check_column(f, schema, "subject_id", pa.types.is_integer, "int64 subject_id")
        meds._check_column(
            f, schema, "prediction_time", pa.types.is_timestamp, "timestamp[us] prediction_time"
        )
        cols = []
        for c, ok in _TYPE_OK.items():
            if c in schema.names:
                t = schema.field(c).type
                if not (ok(t) or pa.types.is_null(t)):
                    raise DataError(
                        f"{f}: column '{c}' has type {t}, expected {meds.LABEL_VALUE_TYPES[c]}"
                    )
                cols.append(c)
        table = meds._read_table(f, ["subject_id", "prediction_time", *cols])
        if table.num_rows == 0:
            continue
        meds._no_nulls(f, table, ["subject_id", "prediction_time"])
        if not cols:
            raise DataError(
                f"{f}: no label value column (boolean_value, integer_value or float_value)"
            )
        k = _file_kind(f, table, cols)
        if kind is not None and k != kind:
            raise DataError(f"{f}: {k} labels, but {first} holds {kind} labels (one kind a task)")
        kind, first = k, first or f
        sids.append(meds._int64_ids(f, table.column("subject_id")))
        times.append(meds._time_us(f, table.column("prediction_time"), "prediction_time"))
        v, d, o = _values(f, table, k)
        values.append(v)
        if d is not None:
            days.append(d)
            observed.append(o)
    if kind is None:
        raise DataError(f"{source.path}: label files hold no rows")
    return TaskLabels(
        name=source.name,
        kind=kind,
        subject_id=np.concatenate(sids),
        prediction_time=np.concatenate(times),
        value=np.concatenate(values),
        files=tuple(str(f) for f in files),
        days=np.concatenate(days) if days else None,
        observed=np.concatenate(observed) if observed else None,
    )


def _column(table: pa.Table, name: str, dtype: pa.DataType) -> np.ndarray:
    return table.column(name).cast(dtype).to_numpy(zero_copy_only=False)


def _values(
    f: Path, table: pa.Table, kind: TaskKind
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    if kind == "binary":
        return _column(table, "boolean_value", pa.bool_()).astype(bool), None, None
    if kind == "regression":
        v = _column(table, "float_value", pa.float64())
        bad = int((~np.isfinite(v)).sum())
        if bad:
            raise DataError(f"{f}: {bad} float_value label(s) are NaN or infinite")
        return v, None, None
    stage = _column(table, "integer_value", pa.int64())
    neg = int((stage < 0).sum())
    if neg:
        raise DataError(f"{f}: {neg} negative integer_value label(s) (classes are 0, 1, 2, ...)")
    if kind == "multiclass":
        return stage, None, None
    d = _column(table, "float_value", pa.float64())
    bad = int((~np.isfinite(d)).sum())
    if bad:
        raise DataError(f"{f}: {bad} float_value (days to the next stage) are NaN or infinite")
    neg = int((d < 0).sum())
    if neg:
        raise DataError(f"{f}: {neg} negative float_value (days to the next stage) label(s)")
    return stage, d, _column(table, "boolean_value", pa.bool_()).astype(bool)
