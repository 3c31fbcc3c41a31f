"""The example cache: same examples as the in-memory cohort, rebuilt when it cannot be trusted."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from foreign_meds import write_foreign

from ehrplan.data import cache as cache_mod
from ehrplan.data import cache_build
from ehrplan.data.cache import Settings, open_cache, prepare
from ehrplan.data.cohort import load_cohort, parse_split_names
from ehrplan.data.dataset import ExampleDataset
from ehrplan.data.examples import Examples, build_examples
from ehrplan.data.meds import fingerprint
from ehrplan.data.synth_write import write_cohort
from ehrplan.data.tasks import read_task, resolve_task
from ehrplan.data.vocab import train_vocab
from ehrplan.errors import DataError

FIELDS = ("codes", "code_mask", "time_features", "stage", "time_to_event", "event_observed")
M, C = 8, 12


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache") / "ckd"
    write_cohort(root, 90, seed=5, shard_size=20)  # several files per split
    return root


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EHRPLAN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _settings(root: Path, **kw: object) -> Settings:
    return Settings.for_request(root, **kw)  # type: ignore[arg-type]


def _same_examples(a: Examples, b: Examples) -> None:
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), f.name
        else:
            assert x == y, f.name


def _assert_same_batches(
    data: Path, cache: cache_mod.ExampleCache, splits: str | None = None
) -> None:
    cohort = load_cohort(data, visit_labels=False, split_names=parse_split_names(splits))
    vocab = train_vocab(cohort)
    assert vocab == cache.vocab
    ids = vocab.encode(cohort.code, cohort.numeric_value)
    assert np.array_equal(ids, cache.tokens)
    labels = read_task(resolve_task(data))
    old_ex = build_examples(cohort, labels, M, C)
    new_ex = cache.examples(M, C)
    _same_examples(old_ex, new_ex)
    assert np.array_equal(cohort.split, cache.split)
    for split in ("train", "tuning", "held_out"):
        old = ExampleDataset(cohort, old_ex, old_ex.in_split(cohort, split), ids)
        new = ExampleDataset(cache, new_ex, new_ex.in_split(cache, split), cache.tokens)
        assert np.array_equal(old.lengths, new.lengths)
        assert old.loss == new.loss
        items = list(range(len(old)))
        for lo in range(0, len(items), 16):
            a, b = old.collate(items[lo : lo + 16]), new.collate(items[lo : lo + 16])
            for f in FIELDS:
                assert torch.equal(getattr(a, f), getattr(b, f)), (split, f)


def test_batches_equal_the_in_memory_cohort(data: Path) -> None:
    cache = prepare(data, _settings(data))
    assert cache.tokens.dtype == np.int16
    assert isinstance(cache.tokens, np.memmap)
    assert cache.header["content_fingerprint"] == fingerprint(data)
    _assert_same_batches(data, cache)


def test_int32_tokens_when_the_vocabulary_outgrows_int16(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_mod, "_INT16_MAX", 10)
    cache = prepare(data, _settings(data))
    assert cache.tokens.dtype == np.int32
    _assert_same_batches(data, cache)


def test_one_and_two_workers_write_the_same_bytes(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = []
    for n in (1, 2):
        monkeypatch.setenv("EHRPLAN_CACHE", str(tmp_path / f"w{n}"))
        paths.append(prepare(data, _settings(data), workers=n).path)
    names = sorted(p.name for p in paths[0].iterdir())
    assert names == sorted(p.name for p in paths[1].iterdir())
    assert len([n for n in names if n.endswith(".npy")]) == 17  # CKD: every array
    for name in names:
        if name != "header.json":  # it names its own folder's data only
            assert (paths[0] / name).read_bytes() == (paths[1] / name).read_bytes(), name
    h = [json.loads((p / "header.json").read_text()) for p in paths]
    assert h[0] == h[1]


@pytest.mark.parametrize("splits", [None, "train=tr,tuning=va,held_out=te"])
def test_foreign_data_the_same_vocabulary_examples_and_splits(
    tmp_path: Path, splits: str | None
) -> None:
    root = tmp_path / "foreign"
    names = None if splits is None else ("tr", "va", "te")  # None: hashed splits
    write_foreign(root, 120, seed=3, split_names=names)
    cache = prepare(root, _settings(root, splits=splits), workers=2)
    assert cache.task is not None and cache.task["kind"] == "binary"
    _assert_same_batches(root, cache, splits)
    assert bool(cache.report.get("splits_file_missing")) == (splits is None)


def test_the_task_keys_the_cache(data: Path, tmp_path: Path) -> None:
    by_name = prepare(data, _settings(data, task="ckd_stage"))
    assert prepare(data, _settings(data)).path == by_name.path  # the only task: the same
    assert prepare(data, _settings(data, labels=data / "tasks" / "ckd_stage")).path == by_name.path
    none = prepare(data, Settings())
    assert none.path != by_name.path and none.task is None
    with pytest.raises(DataError, match="no label task"):
        none.examples(M, C)


def test_a_valid_cache_is_reused_and_a_changed_data_set_rebuilt(data: Path, tmp_path: Path) -> None:
    first = prepare(data, _settings(data))
    stamp = (first.path / "header.json").stat().st_mtime_ns
    assert prepare(data, _settings(data)).path == first.path
    assert (first.path / "header.json").stat().st_mtime_ns == stamp  # opened, not rebuilt
    copy = tmp_path / "copy"
    write_cohort(copy, 30, seed=5)
    before = prepare(copy)
    shard = sorted((copy / "data").rglob("*.parquet"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    after = prepare(copy)
    assert after.path != before.path  # the fingerprint changed: another cache


@pytest.mark.parametrize("damage", ["truncate", "version", "header", "npy_shape"])
def test_a_damaged_cache_is_rebuilt_never_read(data: Path, damage: str) -> None:
    cache = prepare(data, _settings(data))
    path = cache.path
    tokens = path / "tokens.npy"
    if damage == "truncate":
        with open(tokens, "r+b") as f:
            f.truncate(tokens.stat().st_size - 3)
    elif damage == "version":
        h = json.loads((path / "header.json").read_text())
        h["version"] = 999
        (path / "header.json").write_text(json.dumps(h))
    elif damage == "header":
        (path / "header.json").write_text("{not json")
    else:
        raw = bytearray(tokens.read_bytes())
        raw[10:128] = cache_build.npy_header(np.dtype("int16"), (3,))[10:]
        tokens.write_bytes(bytes(raw))
    del cache
    assert open_cache(path) is None
    rebuilt = prepare(data, _settings(data))
    assert rebuilt.path == path
    assert open_cache(path) is not None
    _assert_same_batches(data, rebuilt)


def test_a_full_disk_is_one_error_naming_the_path_and_leaves_no_cache(
    data: Path, cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(self: object, a: np.ndarray) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_build.Appender, "add", full)
    with pytest.raises(DataError, match="no space left") as err:
        prepare(data, _settings(data))
    assert str(cache_home) in str(err.value)
    assert [p for p in (cache_home / "examples").iterdir()] == []


def test_a_build_stopped_midway_leaves_no_cache(
    data: Path, cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = cache_build.Appender.add

    def stop(self: cache_build.Appender, a: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] > 12:
            raise KeyboardInterrupt
        real(self, a)

    monkeypatch.setattr(cache_build.Appender, "add", stop)
    with pytest.raises(KeyboardInterrupt):
        prepare(data, _settings(data))
    assert list((cache_home / "examples").iterdir()) == []
    # a folder left by a build whose process died (SIGKILL) is cleared by the next build
    (cache_home / "examples" / ".deadbeef.999999999.tmp").mkdir()
    monkeypatch.setattr(cache_build.Appender, "add", real)
    cache = prepare(data, _settings(data))
    assert [p.name for p in (cache_home / "examples").iterdir()] == [cache.path.name]


def test_a_given_vocabulary_gets_its_own_cache(data: Path) -> None:
    built = prepare(data, _settings(data))
    small = cache_mod.Vocab(
        tokens=built.vocab.tokens[:20],
        counts=built.vocab.counts[:20],
        min_count=built.vocab.min_count,
        value_bins=built.vocab.value_bins,
        bin_edges=built.vocab.bin_edges,
    )
    other = prepare(data, _settings(data), vocab=small)
    assert other.path != built.path
    assert int(np.max(other.tokens)) < 20
    assert other.vocab == small
    assert Settings().vocab is None


def test_cli_prepare_builds_then_reuses(data: Path, cache_home: Path) -> None:
    first = run_cli("data", "prepare", str(data), "--json")
    assert first.returncode == 0, first.stderr
    doc = json.loads(first.stdout)
    assert doc["reused"] is False and doc["events"] > 0
    assert Path(doc["cache"]).parent == cache_home / "examples"
    assert doc["bytes_on_disk"] == sum(doc["arrays"].values())
    again = json.loads(run_cli("data", "prepare", str(data), "--json").stdout)
    assert again["reused"] is True and again["cache"] == doc["cache"]
    bad = run_cli("data", "prepare", str(data / "nope"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_data_memory_counts_the_cache_bytes_exactly(data: Path) -> None:
    from ehrplan.data.cache import cache_bytes, data_memory

    cache = prepare(data, _settings(data))
    sizes = {
        "events": cache.num_events,
        "visits": cache.num_visits,
        "patients": cache.num_patients,
        "vocab_size": len(cache.vocab),
    }
    examples = cache.header["report"]["labels"]["examples"]
    exact = cache_bytes(
        **sizes, examples=examples, kind="ckd_progression", distinct_codes=len(cache.code_min_id)
    )
    assert exact == cache.disk_bytes()
    sizes |= {"examples": examples, "kind": "ckd_progression"}
    shape = {"batch_size": 4, "max_visits": 8, "max_codes_per_visit": 12}
    solo = data_memory(**sizes, **shape)
    two = data_memory(**sizes, **shape, workers=2, prefetch=2)
    assert solo["cache_pages"] == cache.disk_bytes() - 4 * len(cache.code_min_id)
    assert two["batches"] == 5 * solo["batches"]  # one in training + 2 per worker
    assert solo["total"] == sum(v for k, v in solo.items() if k != "total")
    assert solo["worker_processes"] == 0
    forked = data_memory(**sizes, **shape, workers=2, start_method="fork")
    spawned = data_memory(**sizes, **shape, workers=2, start_method="spawn")
    assert forked["worker_processes"] == 2 * cache_mod.WORKER_FORK_BYTES
    # a spawned worker rebuilds the split's arrays on top of its own interpreter and torch
    each = cache_mod.WORKER_SPAWN_BASE_BYTES + solo["process_arrays"]
    assert spawned["worker_processes"] == 2 * each > forked["worker_processes"]


def test_prepare_never_imports_torch(data: Path) -> None:
    from conftest import run_without_torch

    code, out, err = run_without_torch(["data", "prepare", str(data), "--json"])
    assert code == 0, err
    assert json.loads(out)["events"] > 0


@pytest.mark.parametrize("device", ["cpu", "mps", "cuda"])
def test_data_memory_comes_out_of_the_budget_on_cpu_and_unified_memory(
    data: Path, device: str
) -> None:
    from ehrplan.cli.recommend import with_data
    from ehrplan.data.cache import data_memory
    from ehrplan.plan.planner import budget_from_size
    from ehrplan.plan.units import parse_size

    b = budget_from_size(parse_size("8GiB"), 0.1, device, 1)
    got = with_data(b, data)
    cache = prepare(data, _settings(data))
    need = data_memory(
        events=cache.num_events,
        visits=cache.num_visits,
        patients=cache.num_patients,
        vocab_size=len(cache.vocab),
        examples=cache.header["report"]["labels"]["examples"],
        kind="ckd_progression",
        batch_size=0,
        max_visits=0,
        max_codes_per_visit=0,
    )["total"]
    assert need > 0
    if device == "cuda":  # host RAM, not GPU memory: said, not subtracted
        assert got.budget_bytes == b.budget_bytes and got.data_bytes == 0
        assert "not GPU memory" in got.notes[-1]
    else:
        assert got.data_bytes == need
        assert got.budget_bytes == b.budget_bytes - need
        assert "taken out of the budget" in got.notes[-1]
        assert ("unified memory" in got.notes[-1]) == (device == "mps")


def test_validate_with_data_never_imports_torch(data: Path) -> None:
    from conftest import run_without_torch

    code, out, err = run_without_torch(
        [
            "validate",
            "tiny-lstm",
            "--budget",
            "4GiB",
            "--device",
            "cpu",
            "--data",
            str(data),
            "--json",
        ]
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["budget"]["data_bytes"] > 0
    assert any(n.startswith("--data:") for n in doc["budget"]["notes"])


@pytest.mark.slow
def test_ctrl_c_stops_the_workers_and_leaves_no_build_folder(data: Path, cache_home: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    import psutil

    env = dict(os.environ, EHRPLAN_CACHE=str(cache_home), **{cache_build.FILE_DELAY_ENV: "2"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "ehrplan", "data", "prepare", str(data), "--workers", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's Ctrl-C reaches it
    )
    workers: list[int] = []
    deadline = time.monotonic() + 60
    while len(workers) < 2 and time.monotonic() < deadline:  # both workers in their first file
        time.sleep(0.2)
        workers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert len(workers) == 2
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [
        "interrupted: the example cache was not built (no partial cache is left)"
    ]
    time.sleep(0.5)
    alive = [p for p in workers if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert alive == []
    assert list((cache_home / "examples").iterdir()) == []
