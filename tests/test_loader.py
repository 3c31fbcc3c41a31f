"""The loader: `ExampleDataset.collate` equals a plain per-row loop, and batches cross DataLoader
workers unchanged (the vectorised collate and the cheap pickling may not change a number)."""

from __future__ import annotations

import pickle
from dataclasses import fields, replace
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import pytest
import torch
from foreign_meds import write_foreign

from ehrplan.data.cohort import load_cohort
from ehrplan.data.dataset import ExampleDataset
from ehrplan.data.examples import build_examples
from ehrplan.data.synth_write import write_cohort
from ehrplan.data.tasks import read_task, resolve_task
from ehrplan.data.vocab import UNK_ID, train_vocab
from ehrplan.runtime.batch import IGNORE_INDEX, Batch

SPLITS = ("train", "tuning", "held_out")


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("loader")
    write_cohort(base / "ckd", 60, seed=5)
    write_foreign(base / "foreign", 90, seed=2)
    return {"ckd": base / "ckd", "foreign": base / "foreign"}


def _examples(root: Path, M: int, C: int, kind: str | None):
    cohort = load_cohort(root, visit_labels=False)
    ex = build_examples(cohort, read_task(resolve_task(root)), M, C)
    rng = np.random.default_rng(0)
    if kind == "regression":  # the same windows with other label kinds: every branch of collate
        ex = replace(ex, kind=kind, value=rng.normal(size=len(ex)))
    elif kind == "multiclass":
        ex = replace(ex, kind=kind, value=rng.integers(0, 4, size=len(ex)))
    ids = train_vocab(cohort, min_count=1).encode(cohort.code, cohort.numeric_value)
    return cohort, ex, ids


def reference(ds: ExampleDataset, items: list[int]) -> tuple[dict[str, np.ndarray], list[int]]:
    """The batch written out one sequence, one visit, one label at a time."""
    c, ex, seq = ds.cohort, ds.examples, ds.seq
    rows, labelled = [], []
    for s in items:
        h = int(seq.host[s])
        window = list(range(int(ex.recent_start[h]), int(ex.last_visit[h]) + 1))
        if ex.keep_first[h]:
            window = [int(c.visit_offsets[ex.patient[h]]), *window]
        visits = []
        for j, v in enumerate(window):
            n = int(ex.last_events[h]) if j == len(window) - 1 else c.codes_per_visit()[v]
            e0 = int(c.event_offsets[v])
            ids = ds.ids[e0 : e0 + min(n, ex.max_codes_per_visit)]
            if ds.id_cap is not None:
                ids = np.where(ids >= ds.id_cap, UNK_ID, ids)
            visits.append((v, ids))
        labels = []
        for k in range(int(seq.offsets[s]), int(seq.offsets[s + 1])):
            labels.append((int(seq.members[k]), int(seq.position[k])))
            labelled.append(int(seq.members[k]))
        rows.append((visits, labels))
    B = len(items)
    V = max(1, max(len(v) for v, _ in rows))
    C = max(1, max(len(ids) for v, _ in rows for _, ids in v))
    out = {
        "codes": np.zeros((B, V, C), np.int64),
        "time_features": np.zeros((B, V, 2), np.float32),
        "stage": np.full((B, V), IGNORE_INDEX, np.int64),
        "time_to_event": np.zeros((B, V), np.float32),
        "event_observed": np.zeros((B, V), bool),
    }
    for b, (visits, labels) in enumerate(rows):
        for j, (v, ids) in enumerate(visits):
            out["codes"][b, j, : len(ids)] = ids
            out["time_features"][b, j] = c.time_features[v]
        for m, pos in labels:
            if ex.kind == "regression":
                out["stage"][b, pos] = 0
                out["time_to_event"][b, pos] = ex.value[m]
            else:
                out["stage"][b, pos] = int(ex.value[m])
            if ex.days is not None:
                out["time_to_event"][b, pos] = ex.days[m]
                out["event_observed"][b, pos] = ex.observed[m]
    out["code_mask"] = out["codes"] != 0
    return out, labelled


def _assert_batch_equal(batch: Batch, want: dict[str, np.ndarray]) -> None:
    for f in fields(batch):
        got = getattr(batch, f.name)
        assert got.dtype == torch.from_numpy(want[f.name]).dtype, f.name
        assert np.array_equal(got.numpy(), want[f.name]), f.name


@pytest.mark.parametrize(
    ("which", "kind", "M", "C", "cap"),
    [
        ("ckd", None, 6, 5, None),  # the CKD composite: stage, days, observed; windows cut
        ("ckd", None, 50, 50, 12),  # a vocabulary cap: the rarer ids become UNK
        ("foreign", None, 3, 4, None),  # binary, prediction times inside visits
        ("foreign", "regression", 4, 50, None),
        ("foreign", "multiclass", 1, 2, None),
    ],
)
def test_collate_equals_a_per_row_reference(roots, which, kind, M, C, cap) -> None:
    cohort, ex, ids = _examples(roots[which], M, C, kind)
    assert cap is None or (ids >= cap).any()
    rng = np.random.default_rng(1)
    for split in SPLITS:
        ds = ExampleDataset(cohort, ex, ex.in_split(cohort, split), ids, id_cap=cap)
        n = len(ds)
        batches = [[i] for i in range(min(n, 5))] + [list(range(n))]
        batches += [rng.choice(n, size=min(n, k), replace=False).tolist() for k in (2, 3, 7)]
        for items in batches:
            want, labelled = reference(ds, items)
            _assert_batch_equal(ds.collate(items), want)
            assert ds.label_examples(items).tolist() == labelled


def test_batches_pickle_as_they_were(roots) -> None:
    cohort, ex, ids = _examples(roots["ckd"], 6, 5, None)
    ds = ExampleDataset(cohort, ex, ex.in_split(cohort, "train"), ids)
    batch = ds.collate(list(range(4)))
    want = {f.name: getattr(batch, f.name).numpy().copy() for f in fields(batch)}
    for back in (pickle.loads(ForkingPickler.dumps(batch)), pickle.loads(pickle.dumps(batch))):
        _assert_batch_equal(back, want)
        back.codes[0, 0, 0] = 7  # writable, and not the sender's memory
    assert np.array_equal(batch.codes.numpy(), want["codes"])
    grad = replace(batch, time_features=batch.time_features.clone().requires_grad_())
    assert pickle.loads(pickle.dumps(grad)).time_features.requires_grad  # torch's own path


@pytest.mark.slow
def test_two_workers_give_the_batches_of_no_worker(roots) -> None:
    cohort, ex, ids = _examples(roots["foreign"], 3, 4, None)
    ds = ExampleDataset(cohort, ex, ex.in_split(cohort, "train"), ids)
    batches = [list(range(i, min(i + 3, len(ds)))) for i in range(0, len(ds), 3)]
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=batches, collate_fn=ds.collate, num_workers=2
    )
    got = list(loader)
    assert len(got) == len(batches)
    for b, items in zip(got, batches, strict=True):
        _assert_batch_equal(b, reference(ds, items)[0])
