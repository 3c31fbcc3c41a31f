"""Examples are label rows, cut at prediction time; tasks are named and their kinds read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from foreign_meds import write_foreign
from patient_dataset import EHRDataset

from ehrplan.data.cohort import hashed_splits, load_cohort
from ehrplan.data.dataset import ExampleDataset
from ehrplan.data.examples import build_examples, truncation_loss
from ehrplan.data.synth_write import write_cohort
from ehrplan.data.tasks import read_task, resolve_task
from ehrplan.data.vocab import train_vocab
from ehrplan.errors import DataError
from ehrplan.runtime.batch import IGNORE_INDEX

SPLITS = ("train", "tuning", "held_out")


@pytest.fixture(scope="module")
def ckd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ex") / "ckd"
    write_cohort(out, 80, seed=3)
    return out


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_foreign(tmp_path_factory.mktemp("ex") / "foreign", 120, seed=1, leak=True)


def _datasets(root: Path, M: int, C: int, **kw):
    cohort = load_cohort(root, visit_labels=False, **kw)
    labels = read_task(resolve_task(root))
    ex = build_examples(cohort, labels, M, C)
    ids = train_vocab(cohort, min_count=1).encode(cohort.code, cohort.numeric_value)
    return cohort, labels, ex, ids, {s: ExampleDataset(cohort, ex, ex.in_split(cohort, s), ids)
                                     for s in SPLITS}  # fmt: skip


@pytest.mark.parametrize("which", ["ckd", "foreign"])
def test_one_example_per_label_row_in_every_split(which: str, request) -> None:
    root = request.getfixturevalue(which)
    cohort, labels, ex, _, ds = _datasets(root, 6, 5)
    assert ex.report["label_rows"] == len(labels) and len(ex) == len(labels)  # none dropped
    seen = []
    for s in SPLITS:
        d = ds[s]
        want = np.flatnonzero(cohort.split[ex.patient] == s)
        assert d.num_examples == len(want) > 0
        got = np.concatenate([d.label_examples([i]) for i in range(len(d))])
        assert sorted(got.tolist()) == want.tolist()  # each example read exactly once
        b = d.collate(list(range(len(d))))
        assert int((b.stage != IGNORE_INDEX).sum()) == len(want)  # none overwritten
        seen += got.tolist()
    assert sorted(ex.label_row[seen].tolist()) == list(range(len(labels)))


def test_examples_stop_at_prediction_time_and_keep_the_static_visit(foreign: Path) -> None:
    cohort, _, ex, ids, ds = _datasets(foreign, 3, 40)
    t = cohort.event_time
    for s in SPLITS:
        d = ds[s]
        for i in range(len(d)):
            (e,) = d.label_examples([i])
            p = ex.patient[e]
            pe0 = cohort.event_offsets[cohort.visit_offsets[p]]
            pe1 = cohort.event_offsets[cohort.visit_offsets[p + 1]]
            before = t[pe0:pe1] <= ex.prediction_time[e]
            after = cohort.code[pe0:pe1].filter(pa.array(~before)).to_pylist()
            b = d.collate([i])
            got = b.codes[b.code_mask].tolist()
            # every event it sees is at or before the prediction time ...
            assert len(got) <= int(before.sum())
            # ... the prediction falls inside an admission, so later events of it exist
            assert after
            # the first (static + birth) visit is always slot 0
            first = cohort.event_offsets[cohort.visit_offsets[p]]
            assert b.codes[0, 0, 0].item() == ids[first]


def test_no_example_sees_an_event_after_its_prediction_time(foreign: Path) -> None:
    cohort, _, ex, ids, ds = _datasets(foreign, 16, 64)
    code = np.asarray(cohort.code.to_pylist(), dtype=object)
    leak = ids[code == "DISCHARGE:EXPIRED"]
    assert len(leak) and (leak != 1).all()  # the leak code has its own id: it could be learnt
    hidden = 0
    for d in ds.values():
        for i in range(len(d)):
            b = d.collate([i])
            for e in d.label_examples([i]):
                p = ex.patient[e]
                pe0 = cohort.event_offsets[cohort.visit_offsets[p]]
                pe1 = cohort.event_offsets[cohort.visit_offsets[p + 1]]
                ok = cohort.event_time[pe0:pe1] <= ex.prediction_time[e]
                allowed = set(ids[pe0:pe1][ok].tolist())
                k = int(ex.last_visit[e] - ex.recent_start[e] + ex.keep_first[e])
                seen = set(b.codes[0, : k + 1][b.code_mask[0, : k + 1]].tolist())
                assert seen <= allowed
                hidden += int(leak[0] in set(ids[pe0:pe1][~ok].tolist()) - allowed)
    assert hidden > 0  # some examples have their own admission's leak code after the cut


def test_ckd_examples_equal_todays_where_labels_sit_at_visit_ends(ckd: Path) -> None:
    """For the CKD task, the example of a label at the end of visit k is today's patient
    sequence up to visit k, with the same stage, days and censoring at visit k."""
    M, C = 200, 200  # no truncation: today's window is the whole patient
    old = load_cohort(ckd)  # today's per-visit labels
    vocab = train_vocab(old)
    ids = vocab.encode(old.code, old.numeric_value)
    today = EHRDataset(old, vocab, split=None, max_visits=M, max_codes_per_visit=C, ids=ids)
    cohort = load_cohort(ckd, visit_labels=False)
    ex = build_examples(cohort, read_task(resolve_task(ckd)), M, C)
    assert ex.kind == "ckd_progression" and len(ex) == int((old.stage >= 0).sum())
    checked = 0
    for s in SPLITS:
        d = ExampleDataset(cohort, ex, ex.in_split(cohort, s), ids)
        for i in range(len(d)):
            b = d.collate([i])
            a = today.collate([int(ex.patient[d.seq.host[i]])])
            for e in d.label_examples([i]):
                k = int(ex.last_visit[e] - cohort.visit_offsets[ex.patient[e]])
                n = k + 1
                assert torch.equal(b.codes[0, :n], a.codes[0, :n, : b.codes.shape[2]])
                assert torch.equal(b.time_features[0, :n], a.time_features[0, :n])
                assert b.stage[0, k] == a.stage[0, k] == int(ex.value[e])
                assert b.time_to_event[0, k] == a.time_to_event[0, k]
                assert b.event_observed[0, k] == a.event_observed[0, k]
                checked += 1
    assert checked == len(ex)


def test_truncation_keeps_first_visit_and_counts_what_it_drops(ckd: Path) -> None:
    cohort, _, ex, _, ds = _datasets(ckd, 4, 6)
    loss = truncation_loss(cohort, ex)
    assert 0 < loss.events_dropped < loss.events and loss.visits_dropped > 0
    kept = sum(int(d.collate(list(range(len(d)))).code_mask.sum()) for d in ds.values())
    # packed sequences hold each kept event once per sequence, so count per example instead
    per_example = 0
    for d in ds.values():
        for i in range(len(d)):
            b = d.collate([i])
            for e in d.label_examples([i]):
                k = int(ex.last_visit[e] - ex.recent_start[e] + ex.keep_first[e])
                per_example += int(b.code_mask[0, : k + 1].sum())
    assert per_example == loss.events - loss.events_dropped
    assert kept <= per_example
    assert ex.keep_first.any() and (ex.visits_kept() <= 4).all()


def _label_file(path: Path, **cols: pa.Array) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    n = len(next(iter(cols.values())))
    base = {
        "subject_id": pa.array([7000] * n, pa.int64()),
        "prediction_time": pa.array([1_500_000_000_000_000] * n, pa.int64()).cast(
            pa.timestamp("us")
        ),
    }
    pq.write_table(pa.table(base | cols), path / "0.parquet")
    return path


@pytest.mark.parametrize(
    ("cols", "kind"),
    [
        ({"boolean_value": pa.array([True, False]), "integer_value": pa.nulls(2, pa.int64())},
         "binary"),
        ({"integer_value": pa.array([0, 3]), "float_value": pa.nulls(2, pa.float64())},
         "multiclass"),
        ({"float_value": pa.array([1.5, -2.0]), "categorical_value": pa.nulls(2, pa.string())},
         "regression"),
    ],
)  # fmt: skip
def test_label_kind_comes_from_the_filled_column(tmp_path: Path, cols, kind) -> None:
    lab = read_task(resolve_task(tmp_path, labels=_label_file(tmp_path / "t", **cols)))
    assert lab.kind == kind and len(lab) == 2


@pytest.mark.parametrize(
    ("cols", "message"),
    [
        ({"boolean_value": pa.array([True, None]), "integer_value": pa.nulls(2, pa.int64())},
         "1 of 2 label row(s) with no value column filled"),
        ({"boolean_value": pa.array([True, None]), "integer_value": pa.array([None, 1])},
         "mixed kinds"),
        ({"boolean_value": pa.array([True, True]), "integer_value": pa.array([1, 1])},
         "more than one value column"),
        ({"float_value": pa.array([1.0, float("nan")])}, "NaN or infinite"),
        ({"integer_value": pa.array([1, 2]), "float_value": pa.array([3.0, -1.0]),
          "boolean_value": pa.array([True, False])}, "negative float_value"),
        ({"categorical_value": pa.array(["a", "b"])}, "not supported"),
    ],
)  # fmt: skip
def test_bad_label_files_are_one_line_naming_the_file(tmp_path: Path, cols, message) -> None:
    d = _label_file(tmp_path / "t", **cols)
    with pytest.raises(DataError) as e:
        read_task(resolve_task(tmp_path, labels=d))
    assert message in str(e.value) and str(d / "0.parquet") in str(e.value)
    assert "\n" not in str(e.value)


def test_mixed_kinds_across_files(tmp_path: Path) -> None:
    d = _label_file(tmp_path / "tasks" / "t", boolean_value=pa.array([True]))
    pq.write_table(
        pa.table(
            {
                "subject_id": pa.array([1], pa.int64()),
                "prediction_time": pa.array([0], pa.int64()).cast(pa.timestamp("us")),
                "float_value": pa.array([1.0]),
            }
        ),
        d / "1.parquet",
    )
    with pytest.raises(DataError, match=r"regression labels, but .* holds binary"):
        read_task(resolve_task(tmp_path, task="t"))


def test_task_discovery(tmp_path: Path, foreign: Path) -> None:
    assert resolve_task(foreign).name == "mortality"
    with pytest.raises(DataError, match=r"no task 'nope' in tasks/ \(tasks found: mortality\)"):
        resolve_task(foreign, task="nope")
    _label_file(tmp_path / "tasks" / "a", boolean_value=pa.array([True]))
    _label_file(tmp_path / "tasks" / "b", boolean_value=pa.array([True]))
    with pytest.raises(DataError, match=r"2 tasks \(a, b\); choose one with --task"):
        resolve_task(tmp_path)
    assert resolve_task(tmp_path, task="b").path == tmp_path / "tasks" / "b"


def test_unknown_subjects_and_early_labels_are_counted(tmp_path: Path, foreign: Path) -> None:
    cohort = load_cohort(foreign, visit_labels=False)
    sid = int(cohort.subject_ids[0])
    d = tmp_path / "t"
    d.mkdir()
    pq.write_table(
        pa.table(
            {
                "subject_id": pa.array([sid, sid, 5], pa.int64()),
                "prediction_time": pa.array(
                    [-3 * 10**15, 1_900_000_000_000_000, 1_900_000_000_000_000], pa.int64()
                ).cast(pa.timestamp("us")),
                "boolean_value": pa.array([True, False, True]),
            }
        ),
        d / "0.parquet",
    )
    ex = build_examples(cohort, read_task(resolve_task(foreign, labels=d)), 8, 8)
    assert ex.report["labels_unknown_subject"] == 1
    assert ex.report["labels_before_first_event"] == 1
    assert len(ex) == 1
    pq.write_table(pa.table({"subject_id": pa.array([5], pa.int64()),
                             "prediction_time": pa.array([0], pa.int64()).cast(pa.timestamp("us")),
                             "boolean_value": pa.array([True])}), d / "0.parquet")  # fmt: skip
    with pytest.raises(DataError, match="none of the 1 label rows names a subject"):
        build_examples(cohort, read_task(resolve_task(foreign, labels=d)), 8, 8)


def test_hashed_splits_are_deterministic_80_10_10() -> None:
    ids = np.arange(20_000, dtype=np.int64) * 3 + 11
    a = hashed_splits(ids)
    assert (a == hashed_splits(ids)).all()
    assert (a[5000:6000] == hashed_splits(ids[5000:6000])).all()  # per subject, not positional
    share = {s: float((a == s).mean()) for s in SPLITS}
    assert share["train"] == pytest.approx(0.8, abs=0.02)
    assert share["tuning"] == pytest.approx(0.1, abs=0.02)
