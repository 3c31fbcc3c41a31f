"""`train --workers N`: batches collated in DataLoader worker processes are the batches collated
in the training process, in the same order, so the losses and metrics are too; a resumed run may
change N; workers stop with the block that started them."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from ehrplan.plan.config import get_preset
from ehrplan.runtime.training.data import load_training_data
from ehrplan.runtime.training.loader import feed
from ehrplan.runtime.training.loop import Trainer, TrainSettings
from ehrplan.runtime.training.schedule import steps_per_epoch


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from ehrplan.data.synth_write import write_cohort

    root = tmp_path_factory.mktemp("cohort") / "ckd"
    write_cohort(root, 150, seed=0)
    return load_training_data(root, get_preset("tiny").config)


def _trainer(data: Any, run_dir: Path, workers: int, **kw: Any) -> Trainer:
    d, config = data
    per_epoch = steps_per_epoch(
        len(d.split("train").dataset), config.batch_size, config.gradient_accumulation_steps
    )
    settings = TrainSettings(
        max_steps=per_epoch + 2,  # into the second epoch: a new loader for it
        save_every=3,
        eval_every=4,
        seed=3,
        threads=1,
        workers=workers,
    )
    return Trainer(config, settings, d, run_dir, rich=False, **kw)


def _steps(run_dir: Path) -> list[tuple[int, float, list[int]]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [
        (r["step"], r["loss"], r["max_batch_shape"])
        for r in map(json.loads, lines)
        if r["kind"] == "step"
    ]


@pytest.fixture(scope="module")
def reference(data: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Collated in the training process."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    return _trainer(data, run_dir, workers=0).run()


def test_workers_train_the_same_steps_and_evaluate_alike(
    data: Any, reference: dict[str, Any], tmp_path: Path
) -> None:
    summary = _trainer(data, tmp_path, workers=2).run()
    assert summary["workers"] == 2 and reference["workers"] == 0
    assert summary["epochs_completed"] == reference["epochs_completed"] == 1
    assert _steps(tmp_path) == _steps(Path(reference["run_dir"]))  # every loss, exactly
    for which in ("last", "best"):  # evaluation collated by workers too
        assert summary[which] == reference[which]


def test_a_resumed_run_may_change_its_workers(
    data: Any, reference: dict[str, Any], tmp_path: Path
) -> None:
    class Crash(Exception):
        pass

    def crash(trainer: Trainer, rec: dict[str, Any]) -> None:
        if rec["step"] == 4:  # last.pt is from step 3
            raise Crash

    with pytest.raises(Crash):
        _trainer(data, tmp_path, workers=2, on_step=crash).run()
    summary = _trainer(data, tmp_path, workers=0).run(resume=True)
    assert _steps(tmp_path) == _steps(Path(reference["run_dir"]))
    assert summary["best"] == reference["best"] and summary["last"] == reference["last"]


def test_feed_yields_the_lists_batches_in_order_and_stops_its_workers(
    data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import warnings

    if hasattr(os, "sched_getaffinity"):  # fewer cores than workers: torch's warning is ours
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    d, _ = data
    split = d.split("train")
    collate, cpu = d.collate_for(split), torch.device("cpu")
    lists = [[0, 1, 2], [5], [3, 4], [7, 8, 9, 10], [5]]  # a repeated one, as a stand-in is
    with feed(split.dataset, collate, lists, cpu, workers=0) as stream:
        here = list(stream)
    me = psutil.Process()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with feed(split.dataset, collate, lists, cpu, workers=2) as stream:
            ahead = [next(stream)]  # leave the rest: the block's end stops the workers anyway
            workers = me.children()
            assert len(workers) == 2
            ahead += list(stream)
    assert not [w for w in said if "DataLoader" in str(w.message)], said
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive
    assert len(ahead) == len(here) == len(lists)
    for a, b in zip(ahead, here, strict=True):
        for f in fields(a):
            assert torch.equal(getattr(a, f.name), getattr(b, f.name)), f.name
    with feed(split.dataset, collate, lists, cpu, workers=2) as stream:
        next(stream)  # stopped early, as a run that reaches --max-steps mid-epoch
        workers = me.children()
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive and not me.children()


def test_ranks_predict_their_share_and_gather_one_process_predictions(
    data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three ranks, simulated: each predicts every third chunk of the length order; gathered,
    the predictions and the loss are the single process's."""
    import numpy as np

    from ehrplan.runtime import distributed as dist_
    from ehrplan.runtime.distributed import DistEnv
    from ehrplan.runtime.models import build_model
    from ehrplan.runtime.training.loop import make_loss, predict_split

    d, config = data
    torch.manual_seed(0)
    model, loss_fn = build_model(config), make_loss(d, 1.0)
    split = d.split("tuning")
    n = len(split.dataset)
    size = next(b for b in range(8, n) if -(-n // b) % 3)  # one rank gets a chunk fewer
    calls = {"n": 0}
    model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))

    def predict(env: DistEnv | None) -> Any:
        return predict_split(
            model, loss_fn, split, d.collate_for(split), size, torch.device("cpu"), env=env
        )

    one, one_loss = predict(None)
    chunks = calls["n"]
    shares: dict[int, Any] = {}
    passes = []
    for rank in range(3):  # each rank's share, caught at the gather
        calls["n"] = 0

        def caught(obj: Any, env: DistEnv) -> list[Any]:
            shares[env.rank] = obj
            raise StopIteration

        monkeypatch.setattr(dist_, "all_gather_object", caught)
        with pytest.raises(StopIteration):
            predict(DistEnv(rank=rank, world_size=3))
        passes.append(calls["n"])
    assert sum(passes) == chunks and max(passes) - min(passes) == 1  # each rank its share
    monkeypatch.setattr(dist_, "all_gather_object", lambda obj, env: [shares[r] for r in range(3)])
    for rank in range(3):
        preds, loss = predict(DistEnv(rank=rank, world_size=3))
        assert loss == one_loss
        for f in fields(preds):
            assert np.array_equal(getattr(preds, f.name), getattr(one, f.name)), f.name


def test_a_split_pickles_without_its_events_and_collates_alike_after(
    data: Any, tmp_path: Path
) -> None:
    """What a spawned worker receives: the cache (which maps its files again), the split's
    example indices and the window; the same bytes of overhead for a cohort of 4x the events."""
    import pickle

    from ehrplan.data.synth_write import write_cohort

    write_cohort(tmp_path / "small", 40, seed=1)
    small, _ = load_training_data(tmp_path / "small", get_preset("tiny").config)
    overhead = []
    for d in (small, data[0]):
        for name in ("train", "tuning", "held_out"):
            ds = d.split(name).dataset
            blob = pickle.dumps(ds)
            overhead.append(len(blob) - len(pickle.dumps(ds.cohort)) - ds.idx.nbytes)
            assert len(blob) < ds.ids.nbytes + ds.idx.nbytes  # the tokens are not in it
            back = pickle.loads(blob)
            items = list(range(min(len(ds), 9)))
            a, b = ds.collate(items), back.collate(items)
            for f in fields(a):
                assert torch.equal(getattr(a, f.name), getattr(b, f.name)), f.name
    assert data[0].split("train").dataset.ids.nbytes > 3 * small.split("train").dataset.ids.nbytes
    assert max(overhead) - min(overhead) < 64, overhead  # does not grow with the events


@pytest.mark.slow
def test_spawned_workers_give_the_same_batches(data: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where fork is not used (macOS), a worker is spawned and gets the data set by pickle."""
    from ehrplan.runtime.training import loader

    d, _ = data
    split = d.split("train")
    collate, cpu = d.collate_for(split), torch.device("cpu")
    lists = [[0, 1, 2], [5], [3, 4, 6]]
    with feed(split.dataset, collate, lists, cpu, workers=0) as stream:
        here = list(stream)
    monkeypatch.setattr(loader, "start_method", lambda: "spawn")
    with feed(split.dataset, collate, lists, cpu, workers=1) as stream:
        spawned = list(stream)
    for a, b in zip(spawned, here, strict=True):
        for f in fields(a):
            assert torch.equal(getattr(a, f.name), getattr(b, f.name)), f.name
