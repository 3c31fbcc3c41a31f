"""The example cache: same examples as the in-memory cohort, rebuilt when it cannot be trusted."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from ehrplan.data import cache as cache_mod
from ehrplan.data.cache import Settings, open_cache, prepare
from ehrplan.data.cohort import load_cohort
from ehrplan.data.dataset import EHRDataset
from ehrplan.data.synth_write import write_cohort
from ehrplan.data.vocab import train_vocab
from ehrplan.errors import DataError

FIELDS = ("codes", "code_mask", "time_features", "stage", "time_to_event", "event_observed")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache") / "ckd"
    write_cohort(root, 90, seed=5, shard_size=20)  # several files per split
    return root


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EHRPLAN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _assert_same_batches(data: Path, cache: cache_mod.ExampleCache, **kw: int) -> None:
    cohort = load_cohort(data)
    vocab = train_vocab(cohort)
    assert vocab == cache.vocab
    for split in ("train", "tuning", "held_out"):
        old = EHRDataset(cohort, vocab, split=split, max_visits=8, max_codes_per_visit=12)
        new = EHRDataset(
            cache,
            cache.vocab,
            split=split,
            max_visits=8,
            max_codes_per_visit=12,
            ids=cache.tokens,
            **kw,
        )
        assert np.array_equal(old.patients, new.patients)
        assert np.array_equal(old.lengths, new.lengths)
        assert old.truncation == new.truncation
        items = list(range(len(old)))
        for lo in range(0, len(items), 16):
            a, b = old.collate(items[lo : lo + 16]), new.collate(items[lo : lo + 16])
            for f in FIELDS:
                assert torch.equal(getattr(a, f), getattr(b, f)), (split, f)


def test_batches_equal_the_in_memory_cohort(data: Path) -> None:
    cache = prepare(data)
    assert cache.tokens.dtype == np.int16
    assert isinstance(cache.tokens, np.memmap)
    _assert_same_batches(data, cache)


def test_int32_tokens_when_the_vocabulary_outgrows_int16(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_mod, "_INT16_MAX", 10)
    cache = prepare(data)
    assert cache.tokens.dtype == np.int32
    _assert_same_batches(data, cache)


def test_a_valid_cache_is_reused_and_a_changed_data_set_rebuilt(data: Path, tmp_path: Path) -> None:
    first = prepare(data)
    stamp = (first.path / "header.json").stat().st_mtime_ns
    assert prepare(data).path == first.path
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
    cache = prepare(data)
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
        raw[10:128] = cache_mod._npy_header(np.dtype("int16"), (3,))[10:]
        tokens.write_bytes(bytes(raw))
    del cache
    assert open_cache(path) is None
    rebuilt = prepare(data)
    assert rebuilt.path == path
    assert open_cache(path) is not None
    _assert_same_batches(data, rebuilt)


def test_a_full_disk_is_one_error_naming_the_path_and_leaves_no_cache(
    data: Path, cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(self: object, a: np.ndarray) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_mod._Appender, "add", full)
    with pytest.raises(DataError, match="no space left") as err:
        prepare(data)
    assert str(cache_home) in str(err.value)
    assert [p for p in (cache_home / "examples").iterdir()] == []


def test_a_build_stopped_midway_leaves_no_cache(
    data: Path, cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = cache_mod._Appender.add

    def stop(self: cache_mod._Appender, a: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] > 12:
            raise KeyboardInterrupt
        real(self, a)

    monkeypatch.setattr(cache_mod._Appender, "add", stop)
    with pytest.raises(KeyboardInterrupt):
        prepare(data)
    assert list((cache_home / "examples").iterdir()) == []
    # a folder left by a build whose process died (SIGKILL) is cleared by the next build
    (cache_home / "examples" / ".deadbeef.999999999.tmp").mkdir()
    monkeypatch.setattr(cache_mod._Appender, "add", real)
    cache = prepare(data)
    assert [p.name for p in (cache_home / "examples").iterdir()] == [cache.path.name]


def test_a_given_vocabulary_gets_its_own_cache(data: Path) -> None:
    built = prepare(data)
    small = cache_mod.Vocab(
        tokens=built.vocab.tokens[:20],
        counts=built.vocab.counts[:20],
        min_count=built.vocab.min_count,
        value_bins=built.vocab.value_bins,
        bin_edges=built.vocab.bin_edges,
    )
    other = prepare(data, vocab=small)
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

    cache = prepare(data)
    sizes = {
        "events": cache.num_events,
        "visits": cache.num_visits,
        "patients": cache.num_patients,
        "vocab_size": len(cache.vocab),
    }
    assert cache_bytes(**sizes) == cache.disk_bytes()
    shape = {"batch_size": 4, "max_visits": 8, "max_codes_per_visit": 12}
    solo = data_memory(**sizes, **shape)
    two = data_memory(**sizes, **shape, workers=2, prefetch=2)
    assert solo["cache_pages"] == cache.disk_bytes()
    assert two["batches"] == 5 * solo["batches"]  # one in training + 2 per worker
    assert solo["total"] == sum(v for k, v in solo.items() if k != "total")


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
    cache = prepare(data)
    need = data_memory(
        events=cache.num_events,
        visits=cache.num_visits,
        patients=cache.num_patients,
        vocab_size=len(cache.vocab),
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
