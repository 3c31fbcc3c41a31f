"""The MEDS reader on a data set it did not write, and one-line errors for bad data."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meds_helpers import ROWS_A, ROWS_B, T0, h, table, write_hand_built

from ehrplan.data.cohort import IGNORE_INDEX, load_cohort
from ehrplan.data.meds import read_events
from ehrplan.data.synth import DESCRIPTIONS, TAIL_CODES
from ehrplan.errors import DataError


def test_hand_built_round_trip_keeps_every_event(tmp_path: Path) -> None:
    root = write_hand_built(tmp_path / "m")
    cohort = load_cohort(root, root / "tasks" / "stage")
    rows = ROWS_A + ROWS_B
    # codes the synthetic generator never emits
    synth_codes = set(DESCRIPTIONS) | set(TAIL_CODES)
    assert not {r[2] for r in rows} & synth_codes
    assert cohort.num_events == len(rows)
    got = Counter(
        (int(s), c, None if np.isnan(v) else round(float(v), 3))
        for s, c, v in zip(
            cohort.event_subject, cohort.code.to_pylist(), cohort.numeric_value, strict=True
        )
    )
    want = Counter((s, c, None if v is None else round(v, 3)) for s, _, c, v in rows)
    assert got == want
    assert cohort.report["static_only_events_dropped"] == 0


def test_hand_built_visits_and_time_features(tmp_path: Path) -> None:
    root = write_hand_built(tmp_path / "m")
    cohort = load_cohort(root, root / "tasks" / "stage")
    assert cohort.subject_ids.tolist() == [7, 3, 11]  # file order
    assert cohort.visits_per_patient().tolist() == [3, 1, 2]
    # subject 7: static + 3 events, then 2, then 1
    assert cohort.codes_per_visit().tolist() == [4, 2, 1, 2, 2, 1]
    assert cohort.split.tolist() == ["train", "train", "held_out"]
    tf = cohort.time_features
    assert tf[0].tolist() == [0.0, 0.0]
    year = np.log1p(365.0)
    assert tf[1, 0] == pytest.approx(np.log1p(30.0) / year, rel=1e-5)
    assert tf[2, 1] == pytest.approx(np.log1p(400.0) / year, rel=1e-5)
    # a one-hour window splits subject 7's first visit (events 1 h apart stay, 2 h gaps do not)
    narrow = load_cohort(root, root / "tasks" / "stage", window_hours=0.5)
    assert narrow.visits_per_patient()[0] > 3


def test_labels_join_by_prediction_time(tmp_path: Path) -> None:
    root = write_hand_built(tmp_path / "m")
    c = load_cohort(root, root / "tasks" / "stage")
    # subject 7: visit 0 -> 0; visit 1 labelled 1 at its end, replaced by a later label (2);
    # visit 2 unlabelled. Subject 3's label precedes its first visit: dropped, counted.
    assert c.stage.tolist() == [0, 2, IGNORE_INDEX, IGNORE_INDEX, 1, 1]
    assert c.report["label_rows"] == 6
    assert c.report["label_rows_before_first_visit"] == 1
    assert c.report["label_rows_replaced"] == 1
    assert not c.event_observed.any()  # no float_value/boolean_value in this task


def test_no_labels_and_no_splits(tmp_path: Path) -> None:
    root = write_hand_built(tmp_path / "m", labels=False)
    (root / "metadata" / "subject_splits.parquet").unlink()
    c = load_cohort(root)
    assert (c.stage == IGNORE_INDEX).all()
    assert set(c.split.tolist()) == {"train"}
    assert c.report["splits_file_missing"] == 1


# --- bad data: one DataError naming the file and the problem ----------------------------------


def _write(root: Path, name: str, tbl: pa.Table) -> Path:
    path = root / "data" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(tbl, path)
    return path


def _bad(tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    """A broken data set and the words its error must contain."""
    root = tmp_path / case
    root.mkdir()
    good = table(ROWS_A)
    if case == "missing_column":
        _write(root, "0.parquet", good.drop_columns(["code"]))
        return root, ["0.parquet", "missing column 'code'"]
    if case == "wrong_type":
        bad = good.set_column(1, "time", pa.array([str(r[1]) for r in ROWS_A], pa.string()))
        _write(root, "0.parquet", bad)
        return root, ["0.parquet", "'time'", "type string", "timestamp"]
    if case == "wrong_type_subject":
        bad = good.set_column(0, "subject_id", pa.array(["a"] * len(ROWS_A), pa.string()))
        _write(root, "0.parquet", bad)
        return root, ["0.parquet", "'subject_id'", "int64"]
    if case == "split_across_files":
        _write(root, "0.parquet", table(ROWS_A[4:7]))  # subject 7's later visits
        _write(root, "1.parquet", table(ROWS_A[:4]))  # ... and its earlier ones
        return root, ["1.parquet", "subject 7", "split across", "out of time order"]
    if case == "unsorted":
        _write(root, "0.parquet", table([ROWS_A[0], ROWS_A[2], ROWS_A[1]]))
        return root, ["0.parquet", "subject 7", "out of time order"]
    if case == "not_contiguous":
        _write(root, "0.parquet", table([ROWS_A[1], ROWS_A[7], ROWS_A[2]]))
        return root, ["0.parquet", "subject 7", "not contiguous"]
    if case == "null_code":
        rows = [*ROWS_A[:2], (7, h(3), None, None)]
        _write(root, "0.parquet", table(rows))
        return root, ["0.parquet", "'code'", "null"]
    if case == "empty":
        _write(root, "0.parquet", good.slice(0, 0))
        return root, ["data", "no events"]
    if case == "no_parquet":
        (root / "data").mkdir()
        return root, ["data", "no parquet files"]
    if case == "not_meds":
        (root / "notes.txt").write_text("hello")
        return root, [str(root), "not a MEDS data set"]
    if case == "not_parquet":
        (root / "data").mkdir()
        (root / "data" / "0.parquet").write_text("not parquet")
        return root, ["0.parquet", "not a readable parquet file"]
    if case == "unknown_label_subjects":
        _write(root, "0.parquet", good)
        task = root / "tasks" / "ckd_stage"
        task.mkdir(parents=True)
        pq.write_table(
            pa.table(
                {
                    "subject_id": pa.array([7, 999], pa.int64()),
                    "prediction_time": pa.array([h(1), h(2)], pa.timestamp("us")),
                    "integer_value": pa.array([0, 1], pa.int64()),
                }
            ),
            task / "0.parquet",
        )
        return root, ["0.parquet", "not in the data", "999"]
    raise AssertionError(case)


BAD_CASES = [
    "missing_column",
    "wrong_type",
    "wrong_type_subject",
    "split_across_files",
    "unsorted",
    "not_contiguous",
    "null_code",
    "empty",
    "no_parquet",
    "not_meds",
    "not_parquet",
    "unknown_label_subjects",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_data_is_one_line_naming_file_and_problem(tmp_path: Path, case: str) -> None:
    root, words = _bad(tmp_path, case)
    with pytest.raises(DataError) as info:
        load_cohort(root)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_missing_directory_and_file_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such directory"):
        read_events(tmp_path / "nope")
    f = tmp_path / "file.parquet"
    f.write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        read_events(f)


def test_foreign_types_are_cast_losslessly(tmp_path: Path) -> None:
    """int32 ids, ns time with a zone, dictionary codes, no numeric_value, an empty shard."""
    root = tmp_path / "foreign"
    _write(root, "0-empty.parquet", table(ROWS_A).slice(0, 0))
    t = pa.table(
        {
            "subject_id": pa.array([5, 5, 6], pa.int32()),
            "time": pa.array([1_000, 2_000, 1_500], pa.timestamp("ns", tz="UTC")),
            "code": pa.array(["A", "B", "A"]).dictionary_encode(),
        }
    )
    _write(root, "1.parquet", t)
    ev = read_events(root)
    assert ev.subject_id.tolist() == [5, 5, 6]
    assert ev.time.tolist() == [1, 2, 1]  # microseconds
    assert ev.code.to_pylist() == ["A", "B", "A"]
    assert np.isnan(ev.numeric_value).all()
    # a subject split across files is still caught after an empty shard
    _write(root, "2.parquet", t.slice(2, 1))
    with pytest.raises(
        DataError, match=r"subject 6 is split across data/1\.parquet and data/2\.parquet"
    ):
        read_events(root)


@settings(max_examples=25, deadline=None)
@given(
    gaps=st.lists(
        st.lists(st.integers(min_value=0, max_value=72), min_size=1, max_size=12),
        min_size=1,
        max_size=5,
    ),
    window=st.sampled_from([1.0, 6.0, 24.0]),
)
def test_visits_match_a_naive_sessioniser(gaps: list[list[int]], window: float) -> None:
    """Gap-based visits, vectorised, agree with a plain loop over each subject's events."""
    import tempfile

    rows = []
    for s, subject_gaps in enumerate(gaps):
        t = T0
        for g in subject_gaps:
            t += timedelta(hours=g)
            rows.append((s, t, "X", None))
    with tempfile.TemporaryDirectory() as tmp:
        _write(Path(tmp), "0.parquet", table(rows))
        c = load_cohort(tmp, window_hours=window)
    want = []
    for subject_gaps in gaps:
        visits = 1 + sum(1 for g in subject_gaps[1:] if g > window)
        want.append(visits)
    assert c.visits_per_patient().tolist() == want
    assert c.num_events == len(rows)
