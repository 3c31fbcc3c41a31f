"""Stream the synthetic CKD cohort (`ehrplan.data.synth`) into a MEDS data set, shard by shard.

Blocks of 1,000 patients are simulated one at a time and their events sorted into per-split
buffers; a buffer is written as ``data/<split>/<k>.parquet`` as soon as it holds ``shard_size``
patients. Labels and the subject splits are appended to one parquet file each, a row group per
``shard_size`` patients. Memory is bounded by about three shards of events, whatever the number
of patients. Everything is written into a temporary folder beside ``out``, renamed at the end: a
killed run leaves no half-written data set.
"""

from __future__ import annotations

import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ehrplan.atomic import atomic_dir, write_json
from ehrplan.data.meds import (
    CODES_FILE,
    DATA_DIR,
    DATASET_FILE,
    MEDS_VERSION,
    NULL_TIME,
    SPLITS,
    SPLITS_FILE,
    codes_table,
    write_parquet,
)
from ehrplan.data.synth import BLOCK, CODES, DESCRIPTIONS, TAIL_CODES, TASK_DIR, simulate_block
from ehrplan.errors import UsageError

SHARD_SIZE = 10_000
"""Patients per data file (MEDS extractions commonly shard by 10,000 subjects)."""
BYTES_PER_PATIENT = 1_500
"""Disk bytes per patient, rounded up: the 200,000-patient cohort takes 1,188 per patient
(``ehrplan synth --patients 200000``, then ``du -sb``)."""

_CODE_STRINGS = pa.array(CODES, pa.string())
_LABEL_SCHEMA = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("prediction_time", pa.timestamp("us"), nullable=False),
        pa.field("boolean_value", pa.bool_(), nullable=False),
        pa.field("integer_value", pa.int64(), nullable=False),
        pa.field("float_value", pa.float32(), nullable=False),
    ]
)
_SPLIT_SCHEMA = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
    ]
)
_SPLIT_NAMES = pa.array(SPLITS, pa.string())


@dataclass(frozen=True)
class SynthSummary:
    """What `write_cohort` wrote."""

    out: str
    patients: int
    events: int
    clinical_visits: int
    label_rows: int
    codes: int
    shard_size: int
    files: list[str]
    patients_by_split: dict[str, int]


def _events_table(
    sid: np.ndarray, time: np.ndarray, code: np.ndarray, value: np.ndarray
) -> pa.Table:
    return pa.table(
        {
            "subject_id": pa.array(sid, pa.int64()),
            "time": pa.array(time, pa.int64(), mask=time == NULL_TIME).cast(pa.timestamp("us")),
            # indices into every code: parquet stores them as its dictionary encoding as they are
            "code": pa.DictionaryArray.from_arrays(pa.array(code, pa.int32()), _CODE_STRINGS),
            "numeric_value": pa.array(value, pa.float32(), from_pandas=True),  # NaN -> null
        },
    )


def _write_events(table: pa.Table, path: Path) -> None:
    """One data file; the code column is written as a string column (no arrow schema stored,
    so readers see MEDS's ``string``, not the dictionary it was built as)."""
    pq.write_table(table, path, compression="zstd", store_schema=False)


class _Shards:
    """Per-split buffers of events, written out ``shard_size`` patients at a time."""

    def __init__(self, root: Path, shard_size: int) -> None:
        self.root = root
        self.shard_size = shard_size
        self.pieces: list[list[tuple[np.ndarray, ...]]] = [[] for _ in SPLITS]
        self.held = [0] * len(SPLITS)  # patients buffered per split
        self.written = [0] * len(SPLITS)  # files written per split
        self.patients = [0] * len(SPLITS)
        self.events = 0
        self.files: list[str] = []
        # the parquet encoder releases the GIL: a file is written while the next block is drawn
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: Future[None] | None = None

    def add(self, split: int, piece: tuple[np.ndarray, ...], patients: int) -> None:
        self.pieces[split].append(piece)
        self.held[split] += patients
        self.patients[split] += patients
        while self.held[split] >= self.shard_size:
            self._flush(split, self.shard_size)

    def close(self) -> None:
        for split in range(len(SPLITS)):
            if self.held[split]:
                self._flush(split, self.held[split])
        self._wait()
        self.pool.shutdown()

    def _wait(self) -> None:
        if self.pending is not None:
            self.pending.result()  # re-raises a failed write here
            self.pending = None

    def _flush(self, split: int, patients: int) -> None:
        sid, time, code, value = (np.concatenate(c) for c in zip(*self.pieces[split], strict=True))
        starts = np.flatnonzero(sid[1:] != sid[:-1]) + 1  # where each later patient begins
        cut = int(starts[patients - 1]) if len(starts) >= patients else len(sid)
        rel = Path(DATA_DIR) / SPLITS[split] / f"{self.written[split]}.parquet"
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        table = _events_table(sid[:cut], time[:cut], code[:cut], value[:cut])
        self._wait()  # at most one file in flight: memory stays bounded
        self.pending = self.pool.submit(_write_events, table, self.root / rel)
        self.files.append(str(rel))
        self.events += cut
        self.written[split] += 1
        self.held[split] -= patients
        rest = (sid[cut:], time[cut:], code[cut:], value[cut:])
        self.pieces[split] = [rest] if cut < len(sid) else []


class _Appender:
    """One parquet file written a row group per ``rows`` buffered patients."""

    def __init__(self, path: Path, schema: pa.Schema, rows: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = pq.ParquetWriter(path, schema, compression="zstd")
        self.schema = schema
        self.rows = rows
        self.tables: list[pa.Table] = []
        self.held = 0

    def add(self, table: pa.Table, patients: int) -> None:
        self.tables.append(table)
        self.held += patients
        if self.held >= self.rows:
            self._flush()

    def _flush(self) -> None:
        if self.tables:
            self.writer.write_table(pa.concat_tables(self.tables))
        self.tables, self.held = [], 0

    def close(self) -> None:
        self._flush()
        self.writer.close()


def _check_out(out: Path, n_patients: int, shard_size: int) -> None:
    if n_patients < 1:
        raise UsageError(f"--patients must be at least 1 (got {n_patients})")
    if shard_size < 1:
        raise UsageError(f"--shard-size must be at least 1 (got {shard_size})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(
            f"{out} already exists and is not an empty directory; choose another --out"
        )
    where = out.absolute()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    need = n_patients * BYTES_PER_PATIENT
    if need > free:
        raise UsageError(
            f"{out}: {n_patients:,} patients need about {need / 1e9:.1f} GB on disk, "
            f"{free / 1e9:.1f} GB free there; choose fewer --patients or another --out"
        )


def write_cohort(
    out: str | Path, n_patients: int, seed: int = 0, shard_size: int = SHARD_SIZE
) -> SynthSummary:
    """Generate and write the cohort as a MEDS data set at ``out`` (built aside, then renamed)."""
    out = Path(out)
    _check_out(out, n_patients, shard_size)
    with atomic_dir(out) as tmp:  # mode 0777 & ~umask (mkdtemp's would be 0700); renamed at the end
        return _write(tmp, out, n_patients, seed, shard_size)


def _write(tmp: Path, out: Path, n_patients: int, seed: int, shard_size: int) -> SynthSummary:
    from ehrplan import __version__

    shards = _Shards(tmp, shard_size)
    labels = _Appender(tmp / TASK_DIR / "0.parquet", _LABEL_SCHEMA, shard_size)
    splits = _Appender(tmp / SPLITS_FILE, _SPLIT_SCHEMA, shard_size)
    seen = np.zeros(len(CODES), dtype=bool)
    label_rows = 0
    try:
        for b in range(-(-n_patients // BLOCK)):
            first = b * BLOCK
            keep = min(BLOCK, n_patients - first)
            block = simulate_block(seed, b)
            cut = int(np.searchsorted(block.patient, keep))
            patient, code = block.patient[:cut], block.code[:cut]
            seen |= np.bincount(code, minlength=len(CODES)) > 0
            split = block.split[:keep]
            ev_split = split[patient]
            for s in range(len(SPLITS)):
                sel = ev_split == s
                piece = (
                    first + patient[sel],
                    block.time[:cut][sel],
                    code[sel],
                    block.value[:cut][sel],
                )
                shards.add(s, piece, int((split == s).sum()))
            lcut = int(np.searchsorted(block.label_patient, keep))
            labels.add(
                pa.table(
                    {
                        "subject_id": first + block.label_patient[:lcut],
                        "prediction_time": pa.array(block.label_time[:lcut]).cast(
                            pa.timestamp("us")
                        ),
                        "boolean_value": block.label_seen[:lcut],
                        "integer_value": block.label_stage[:lcut].astype(np.int64),
                        "float_value": block.label_days[:lcut],
                    },
                    schema=_LABEL_SCHEMA,
                ),
                keep,
            )
            label_rows += lcut
            splits.add(
                pa.table(
                    {
                        "subject_id": np.arange(first, first + keep, dtype=np.int64),
                        "split": _SPLIT_NAMES.take(pa.array(split.astype(np.int32))),
                    },
                    schema=_SPLIT_SCHEMA,
                ),
                keep,
            )
        shards.close()
    finally:
        labels.close()
        splits.close()
    all_codes = sorted(CODES[i] for i in np.flatnonzero(seen))
    write_parquet(codes_table(all_codes, DESCRIPTIONS | _tail_descriptions()), tmp / CODES_FILE)
    write_json(
        tmp / DATASET_FILE,
        {
            "dataset_name": "ehrplan-synthetic-ckd",
            "dataset_version": f"seed={seed},patients={n_patients},shard_size={shard_size}",
            "etl_name": "ehrplan synth",
            "etl_version": __version__,
            "meds_version": MEDS_VERSION,
            "license": "CC0-1.0 (synthetic data, no real patients)",
        },
        sort_keys=True,
    )
    files = [*shards.files, str(CODES_FILE), str(SPLITS_FILE), str(DATASET_FILE)]
    return SynthSummary(
        out=str(out),
        patients=n_patients,
        events=shards.events,
        clinical_visits=label_rows,
        label_rows=label_rows,
        codes=len(all_codes),
        shard_size=shard_size,
        files=[*files, str(TASK_DIR / "0.parquet")],
        patients_by_split=dict(zip(SPLITS, shards.patients, strict=True)),
    )


def _tail_descriptions() -> dict[str, str]:
    return {c: "synthetic placeholder code (long tail)" for c in TAIL_CODES}
