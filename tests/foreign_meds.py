"""A MEDS data set laid out the way other extraction tools write one (not `ehrplan synth`).

- codes of its own spelling (``ADMISSION:EMERGENCY``, ``LAB:LACTATE:HIGH``, ``GENDER:F``), a
  static null-time gender event and a ``MEDS_BIRTH`` decades before the first admission;
- admissions of one to five days with an event every few hours (one visit each at a 24-hour
  window), a few per subject, in two data shards;
- a binary task ``tasks/NAME/part-*.parquet`` whose files carry all four value columns, three of
  them all null, with each ``prediction_time`` 24 hours into an admission (inside it);
- ``metadata/subject_splits.parquet`` with the split names given (or none at all).

The label is drawn per admission: positive with probability 0.7 when a ``LAB:LACTATE:HIGH`` event
precedes the prediction time (``signal``), else 0.1 (or 0.3 for every admission when
``signal=False``). With ``leak``, a ``DISCHARGE:EXPIRED`` event follows the prediction time in
exactly the positive admissions: a model that could see past the prediction time would read the
label from it. ``leak_at_prediction``: the same event sits *at* the prediction time, which MEDS
allows a model to see (the positive control of the leakage test).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HOUR_US = 3_600_000_000
T0_US = 1_400_000_000 * 1_000_000  # 2014-05-13
FILLER = [f"DIAGNOSIS:ICD10:X{i:02d}" for i in range(30)] + [
    f"MEDICATION:RXNORM:{i}" for i in range(20)
]


def write_foreign(
    root: Path,
    subjects: int = 300,
    *,
    seed: int = 0,
    task: str = "mortality",
    signal: bool = True,
    leak: bool = False,
    leak_at_prediction: bool = False,
    split_names: tuple[str, str, str] | None = ("train", "tuning", "held_out"),
) -> Path:
    rng = np.random.default_rng(seed)
    rows: list[tuple[int, int | None, str, float | None]] = []
    labels: list[tuple[int, int, bool]] = []
    sids = np.arange(1000, 1000 + subjects) * 7  # not 0..N-1
    for sid in sids.tolist():
        rows.append((sid, None, "GENDER:F" if rng.random() < 0.5 else "GENDER:M", None))
        t = T0_US + int(rng.integers(0, 2000)) * 24 * HOUR_US
        rows.append((sid, t - int(rng.integers(30, 80)) * 365 * 24 * HOUR_US, "MEDS_BIRTH", None))
        for _ in range(int(rng.integers(1, 4))):
            hours = int(rng.integers(36, 120))
            risky = rng.random() < 0.4
            p = (0.7 if risky else 0.1) if signal else 0.3
            positive = bool(rng.random() < p)
            pred = t + 24 * HOUR_US
            rows.append((sid, t, "ADMISSION:EMERGENCY", None))
            if risky and signal:
                rows.append((sid, t + HOUR_US, "LAB:LACTATE:HIGH", float(rng.normal(4.5, 0.5))))
            for h in range(2, hours, 3):
                rows.append((sid, t + h * HOUR_US, FILLER[int(rng.integers(len(FILLER)))], None))
                if h % 6 == 2:
                    rows.append((sid, t + h * HOUR_US, "LAB:SODIUM", float(rng.normal(139, 3))))
            if leak and positive:
                at = pred if leak_at_prediction else pred + HOUR_US
                rows.append((sid, at, "DISCHARGE:EXPIRED", None))
            rows.append((sid, t + hours * HOUR_US, "DISCHARGE:HOME", None))
            labels.append((sid, pred, positive))
            t += hours * HOUR_US + int(rng.integers(20, 400)) * 24 * HOUR_US
    # each subject's rows sorted by time, static (None) first
    rows.sort(key=lambda r: (r[0], r[1] is not None, r[1] or 0))
    (root / "data" / "train").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(exist_ok=True)
    half = sids[subjects // 2]
    for name, part in (
        ("train/0.parquet", [r for r in rows if r[0] < half]),
        ("train/1.parquet", [r for r in rows if r[0] >= half]),
    ):
        s, t, c, v = zip(*part, strict=True)
        pq.write_table(
            pa.table(
                {
                    "subject_id": pa.array(s, pa.int64()),
                    "time": pa.array(t, pa.int64()).cast(pa.timestamp("us")),
                    "code": pa.array(c, pa.string()),
                    "numeric_value": pa.array(v, pa.float32()),
                }
            ),
            root / "data" / name,
        )
    if split_names is not None:
        u = rng.random(subjects)
        names = np.where(
            u < 0.7, split_names[0], np.where(u < 0.85, split_names[1], split_names[2])
        )
        pq.write_table(
            pa.table({"subject_id": pa.array(sids, pa.int64()), "split": names.tolist()}),
            root / "metadata" / "subject_splits.parquet",
        )
    ls, lt, lv = zip(*labels, strict=True)
    n = len(ls)
    (root / "tasks" / task).mkdir(parents=True, exist_ok=True)
    for k, sl in enumerate((slice(0, n // 2), slice(n // 2, n))):
        pq.write_table(
            pa.table(
                {
                    "subject_id": pa.array(ls[sl], pa.int64()),
                    "prediction_time": pa.array(lt[sl], pa.int64()).cast(pa.timestamp("us")),
                    "boolean_value": pa.array(lv[sl], pa.bool_()),
                    "integer_value": pa.nulls(len(ls[sl]), pa.int64()),
                    "float_value": pa.nulls(len(ls[sl]), pa.float64()),
                    "categorical_value": pa.nulls(len(ls[sl]), pa.string()),
                }
            ),
            root / "tasks" / task / f"part-{k}.parquet",
        )
    return root
