"""Training reads the example cache: the same batches, info and losses as the in-memory path it
replaced (`inmemory_data.load_in_memory`), on the synthetic CKD task and a foreign binary task,
with and without a vocabulary cap."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from foreign_meds import write_foreign
from inmemory_data import load_in_memory

from ehrplan.data.synth_write import write_cohort
from ehrplan.data.tasks import DataRequest
from ehrplan.plan.config import get_preset
from ehrplan.runtime.training.data import SPLITS, load_training_data

FIELDS = ("codes", "code_mask", "time_features", "stage", "time_to_event", "event_observed")


@pytest.fixture(scope="module")
def ckd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckdtrain") / "ckd"
    write_cohort(root, 120, seed=2, shard_size=40)
    return root


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("foreigntrain") / "f"
    write_foreign(root, 160, seed=4, split_names=("tr", "va", "te"))
    return root


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EHRPLAN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _config(cap: int | None, mv: int = 6, mc: int = 5) -> Any:
    update: dict[str, Any] = {"max_visits": mv, "max_codes_per_visit": mc}
    if cap is not None:
        update["vocab_size"] = cap
    return get_preset("tiny").config.model_copy(update=update)


def _same_data(new: Any, old: Any) -> None:
    (d_new, c_new), (d_old, c_old) = new, old
    assert c_new == c_old
    assert d_new.info == d_old.info  # every recorded field, the fingerprint and UNK share too
    assert d_new.task == d_old.task
    assert d_new.vocab == d_old.vocab
    assert d_new.majority_stage == d_old.majority_stage
    if d_old.train_times is None:
        assert d_new.train_times is None
    else:
        for a, b in zip(d_new.train_times, d_old.train_times, strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    assert np.array_equal(d_new.subject_splits[0], d_old.subject_splits[0])
    assert d_new.subject_splits[1] == d_old.subject_splits[1]
    for split in SPLITS:
        a, b = d_new.split(split), d_old.split(split)
        assert np.array_equal(a.lengths, b.lengths), split
        assert a.dataset.loss == b.dataset.loss, split
        assert len(a.dataset) == len(b.dataset)
        items = list(range(len(a.dataset)))
        for lo in range(0, len(items), 7):
            chunk = items[lo : lo + 7]
            x, y = d_new.collate_for(a)(chunk), d_old.collate_for(b)(chunk)
            for f in FIELDS:
                assert torch.equal(getattr(x, f), getattr(y, f)), (split, f)
            assert np.array_equal(a.dataset.label_examples(chunk), b.dataset.label_examples(chunk))


@pytest.mark.parametrize("cap", [None, 20])
def test_the_cache_gives_the_in_memory_batches_ckd(ckd: Path, cap: int | None) -> None:
    new = load_training_data(ckd, _config(cap))
    assert new[0].split("train").dataset.id_cap == (cap if cap is not None else None)
    _same_data(new, load_in_memory(ckd, _config(cap)))


@pytest.mark.parametrize("cap", [None, 12])
def test_the_cache_gives_the_in_memory_batches_foreign_binary(
    foreign: Path, cap: int | None
) -> None:
    req = DataRequest(task="mortality", splits="train=tr,tuning=va,held_out=te", min_code_count=2)
    new = load_training_data(foreign, _config(cap, mv=3, mc=4), request=req)
    assert new[0].task["kind"] == "binary"
    _same_data(new, load_in_memory(foreign, _config(cap, mv=3, mc=4), request=req))


def test_a_saved_vocabulary_keys_its_own_cache(ckd: Path, tmp_path: Path) -> None:
    from ehrplan.data.vocab import Vocab

    first, _ = load_training_data(ckd, _config(20))
    saved = tmp_path / "vocab.json"
    Vocab(**{**_vocab_fields(first.vocab)}).save(saved)
    new = load_training_data(ckd, _config(None), saved)
    _same_data(new, load_in_memory(ckd, _config(None), saved))
    assert new[1].vocab_size == 20


def _vocab_fields(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "tokens": tuple(doc["tokens"]),
        "counts": tuple(doc["counts"]),
        "min_count": doc["min_count"],
        "value_bins": doc["value_bins"],
        "bin_edges": doc["bin_edges"],
    }


def test_a_few_training_steps_have_the_in_memory_losses(ckd: Path, tmp_path: Path) -> None:
    from ehrplan.runtime.training.loop import Trainer, TrainSettings

    settings = TrainSettings(max_steps=4, save_every=4, eval_every=2, seed=1, threads=1)
    losses = []
    for name, load in (("cache", load_training_data), ("memory", load_in_memory)):
        data, config = load(ckd, _config(40))
        run = tmp_path / name
        Trainer(config, settings, data, run, rich=False).run()
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        losses.append([{k: v for k, v in r.items() if "loss" in k} for r in rows])
    assert any(losses[0]) and losses[0] == losses[1]


def test_a_slow_build_says_so_a_quick_one_and_a_reused_one_do_not(
    ckd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ehrplan.data import cache_build

    lines: list[str] = []
    load_training_data(ckd, _config(None), say=lines.append)  # well under 2 s: no line
    assert lines == []
    monkeypatch.setenv("EHRPLAN_CACHE", str(tmp_path / "other"))
    monkeypatch.setattr(cache_build.Progress, "FIRST_SECONDS", 0.0)  # as if slow
    monkeypatch.setattr(cache_build.Progress, "EVERY_SECONDS", 0.0)
    load_training_data(ckd, _config(None), say=lines.append)
    assert lines[0] == f"building the example cache of {ckd} (first use)"
    assert lines[-1].endswith("data files") and len(lines) > 2
    lines.clear()
    load_training_data(ckd, _config(20), say=lines.append)  # another cap: the same cache
    assert lines == []


def test_a_split_pickles_without_the_mapped_arrays(ckd: Path) -> None:
    import pickle

    data, _ = load_training_data(ckd, _config(20))
    ds = data.split("train").dataset
    tokens = ds.ids
    assert tokens.nbytes > 10_000 and len(pickle.dumps(tokens)) < 1_000  # by reference
    back = pickle.loads(pickle.dumps(ds))  # as a spawned DataLoader worker receives it
    items = list(range(min(len(ds), 9)))
    a, b = ds.collate(items), back.collate(items)
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f
