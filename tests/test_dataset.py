"""Vocabulary on the train split, per-batch padding, counted truncation, length bucketing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from meds_helpers import write_hand_built
from patient_dataset import EHRDataset

from ehrplan.data.cohort import Cohort, load_cohort
from ehrplan.data.stats import batch_dims, truncation
from ehrplan.data.synth_write import write_cohort
from ehrplan.data.vocab import PAD_ID, UNK_ID, Vocab, build_vocab, train_vocab
from ehrplan.errors import DataError
from ehrplan.runtime.batch import IGNORE_INDEX


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    out = tmp_path_factory.mktemp("ds") / "ckd"
    write_cohort(out, 150, seed=1)
    return load_cohort(out)


@pytest.fixture(scope="module")
def vocab(cohort: Cohort) -> Vocab:
    return train_vocab(cohort, min_count=3, value_bins=5)


def test_vocab_train_only_cutoff_and_json(tmp_path: Path, cohort: Cohort, vocab: Vocab) -> None:
    assert vocab.tokens[PAD_ID] == "[PAD]" and vocab.tokens[UNK_ID] == "[UNK]"
    train = cohort.event_mask(cohort.patients_in("train"))
    train_tokens = vocab.tokenize(cohort.code.filter(pa.array(train)), cohort.numeric_value[train])
    counts = pa.compute.value_counts(train_tokens)
    kept = {
        v.as_py()
        for v, n in zip(counts.field("values"), counts.field("counts"), strict=True)
        if n.as_py() >= 3
    }
    assert set(vocab.tokens[2:]) == kept  # exactly the train tokens over the cut-off
    assert list(vocab.counts[2:]) == sorted(vocab.counts[2:], reverse=True)
    # a token seen only outside train is UNK
    other = ~train
    other_tokens = set(
        vocab.tokenize(cohort.code.filter(pa.array(other)), cohort.numeric_value[other]).to_pylist()
    )
    only_outside = other_tokens - set(train_tokens.to_pylist())
    assert only_outside  # the Zipf tail guarantees some
    ids = vocab.encode(pa.array(sorted(only_outside)), np.full(len(only_outside), np.nan))
    assert (ids == UNK_ID).all()
    # lab values are binned into the token, edges from train
    assert "LOINC//2160-0" in vocab.bin_edges
    assert any(t.startswith("LOINC//2160-0//Q") for t in vocab.tokens)
    vocab.save(tmp_path / "vocab.json")
    assert Vocab.load(tmp_path / "vocab.json") == vocab
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(DataError, match="not an ehrplan vocabulary"):
        Vocab.load(tmp_path / "bad.json")


def test_value_bins_zero_keeps_code_identity(cohort: Cohort) -> None:
    v = build_vocab(cohort.code, cohort.numeric_value, min_count=1, value_bins=0)
    assert not v.bin_edges
    assert not any("//Q" in t for t in v.tokens)


def test_collate_pads_per_batch_to_the_batch_maxima(cohort: Cohort, vocab: Vocab) -> None:
    ds = EHRDataset(cohort, vocab, split="train", max_visits=1000, max_codes_per_visit=1000)
    items = [ds[i] for i in range(7)]
    b = ds.collate(items)
    nv = cohort.visits_per_patient()[items]
    cpv = cohort.codes_per_visit()
    widest = max(cpv[cohort.visit_offsets[p] : cohort.visit_offsets[p + 1]].max() for p in items)
    assert b.codes.shape == (7, nv.max(), widest)
    assert b.codes.dtype == torch.int64 and b.code_mask.dtype == torch.bool
    assert b.time_features.shape == (7, nv.max(), 2) and b.time_features.dtype == torch.float32
    assert b.stage.dtype == torch.int64 and b.time_to_event.dtype == torch.float32
    assert b.event_observed.dtype == torch.bool
    assert int(b.code_mask.sum()) == sum(cohort.events_per_patient()[items])
    assert (b.codes[~b.code_mask] == 0).all() and (b.codes[b.code_mask] > 0).all()
    # padded visits: stage -100, no codes; real visits first
    vm = b.visit_mask
    assert (b.stage[~vm] == IGNORE_INDEX).all()
    assert vm.sum(1).tolist() == nv.tolist()
    # patient 0's codes, in order, are its event ids
    p = items[0]
    e0, e1 = (
        cohort.event_offsets[cohort.visit_offsets[p]],
        cohort.event_offsets[cohort.visit_offsets[p + 1]],
    )
    assert b.codes[0][b.code_mask[0]].tolist() == ds.ids[e0:e1].tolist()


def test_truncation_is_explicit_and_counted(cohort: Cohort, vocab: Vocab) -> None:
    V, C = 4, 5
    ds = EHRDataset(cohort, vocab, split=None, max_visits=V, max_codes_per_visit=C)
    tr = ds.truncation
    # recount by hand, patient by patient
    lost = cut_patients = dropped = cut_visits = 0
    for p in range(cohort.num_patients):
        cpv = cohort.codes_per_visit()[cohort.visit_offsets[p] : cohort.visit_offsets[p + 1]]
        kept = cpv[-V:]
        cut_patients += len(cpv) > V
        dropped += max(len(cpv) - V, 0)
        cut_visits += int((kept > C).sum())
        lost += int(cpv.sum() - np.minimum(kept, C).sum())
    assert (tr.patients_truncated, tr.visits_dropped) == (cut_patients, dropped)
    assert (tr.visits_truncated, tr.events_dropped) == (cut_visits, lost)
    assert lost > 0
    b = ds.collate(list(range(cohort.num_patients)))
    assert b.codes.shape[1] <= V and b.codes.shape[2] <= C
    assert int(b.code_mask.sum()) == tr.events - tr.events_dropped
    # the most recent visits are kept: the last real visit's time feature is the patient's last
    p = int(np.argmax(cohort.visits_per_patient()))
    last = cohort.visit_offsets[p + 1] - 1
    assert b.time_features[p, V - 1].tolist() == pytest.approx(cohort.time_features[last].tolist())


def test_loader_covers_every_patient_and_bucketing_pads_less(cohort: Cohort, vocab: Vocab) -> None:
    ds = EHRDataset(cohort, vocab, split="train", max_visits=50, max_codes_per_visit=50)
    padded = {}
    for bucketing in (False, True):
        seen: list[int] = []
        positions = real = 0
        for b in ds.loader(8, bucketing=bucketing, seed=5):
            positions += b.codes.numel()
            real += int(b.code_mask.sum())
            seen += [1] * b.num_patients
        assert len(seen) == len(ds)
        assert real == ds.truncation.events - ds.truncation.events_dropped
        padded[bucketing] = positions
        # the stats module predicts the same padding without building tensors
        dims = batch_dims(cohort, ds.patients, 8, 50, 50, bucketing=bucketing, seed=5)
        assert dims["padding_ratio"] == pytest.approx(positions / real, rel=1e-3)
    assert padded[True] < padded[False]
    full = len(ds) * 50 * 50
    assert padded[False] < full


def test_stage_labels_beyond_num_stages_are_an_error(cohort: Cohort, vocab: Vocab) -> None:
    with pytest.raises(DataError, match="num_stages"):
        EHRDataset(cohort, vocab, max_visits=8, max_codes_per_visit=8, num_stages=3)


def test_hand_built_set_batches(tmp_path: Path) -> None:
    root = write_hand_built(tmp_path / "m")
    c = load_cohort(root, root / "tasks" / "stage")
    v = train_vocab(c, min_count=1)
    ds = EHRDataset(c, v, split=None, max_visits=10, max_codes_per_visit=10)
    b = ds.collate([0, 1, 2])
    assert b.codes.shape == (3, 3, 4)
    assert b.stage[0].tolist() == [0, 2, IGNORE_INDEX]
    # subject 11 is held out: its PROC//OTHER-C is not in the train vocabulary -> UNK
    assert (b.codes[2][b.code_mask[2]] == UNK_ID).any()
    assert truncation(c, np.arange(3), 10, 10).events_dropped == 0
