"""A MEDS data set built by hand with pyarrow: a code path independent of `ehrplan synth`.

Its codes (``LAB//K+``, ``HOSP//ADMIT``, ...) are ones the synthetic generator never emits, its
types are the lenient ones a foreign ETL may write (float64 values, timestamp[ms] in one file,
a nested shard), and it has a static null-time event.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

T0 = datetime(2020, 1, 1, 9, 0)


def h(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


# (subject, time, code, value); per subject sorted by time, static events (None) first
ROWS_A = [
    (7, None, "SEX//X", None),
    (7, h(0), "HOSP//ADMIT", None),
    (7, h(1), "LAB//K+", 4.1),
    (7, h(2), "DX//OTHER-A", None),
    (7, h(24 * 30), "LAB//K+", 5.9),  # a month later: a second visit
    (7, h(24 * 30 + 3), "RX//OTHER-B", None),
    (7, h(24 * 400), "HOSP//ADMIT", None),  # a third visit
    (3, h(5), "HOSP//ADMIT", None),
    (3, h(6), "LAB//K+", 3.7),
]
ROWS_B = [
    (11, h(100), "PROC//OTHER-C", None),
    (11, h(100), "LAB//Na", 139.0),
    (11, h(100 + 24 * 7), "PROC//OTHER-C", None),
]


def table(rows: list[tuple], time_unit: str = "us", value_type: pa.DataType = pa.float64()):
    sid, t, code, val = zip(*rows, strict=True)
    return pa.table(
        {
            "subject_id": pa.array(sid, pa.int64()),
            "time": pa.array(t, pa.timestamp(time_unit)),
            "code": pa.array(code, pa.string()),
            "numeric_value": pa.array(val, value_type),
            "extra_column": pa.array(["x"] * len(rows), pa.string()),  # MEDS allows extras
        }
    )


def write_hand_built(root: Path, labels: bool = True) -> Path:
    """Two data files (one nested, one in milliseconds), splits, and a stage label task."""
    (root / "data" / "shard").mkdir(parents=True)
    (root / "metadata").mkdir()
    pq.write_table(table(ROWS_A), root / "data" / "a.parquet")
    pq.write_table(table(ROWS_B, time_unit="ms"), root / "data" / "shard" / "b.parquet")
    pq.write_table(
        pa.table(
            {
                "subject_id": pa.array([7, 3, 11], pa.int64()),
                "split": ["train", "train", "held_out"],
            }
        ),
        root / "metadata" / "subject_splits.parquet",
    )
    if labels:
        (root / "tasks" / "stage").mkdir(parents=True)
        pq.write_table(
            pa.table(
                {
                    "subject_id": pa.array([7, 7, 7, 3, 11, 11], pa.int64()),
                    "prediction_time": pa.array(
                        [h(2), h(24 * 30 + 3), h(24 * 200), h(-5), h(100), h(100 + 24 * 7)],
                        pa.timestamp("us"),
                    ),
                    "integer_value": pa.array([0, 1, 2, 0, 1, 1], pa.int64()),
                },
            ),
            root / "tasks" / "stage" / "labels.parquet",
        )
    return root
