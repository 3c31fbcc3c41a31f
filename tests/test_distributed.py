"""Pure logic of distributed runs: environment, batch split, strategy checks, sharding units."""

from __future__ import annotations

import pytest

from ehrplan.errors import UsageError
from ehrplan.plan.config import get_preset
from ehrplan.plan.per_gpu import check_strategy, split_batch
from ehrplan.runtime.distributed import (
    DistEnv,
    check_resume,
    rank_share,
    shard_blocks,
    torchrun_argv,
)


def test_env_from_torchrun_variables():
    env = DistEnv.from_environ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert env.is_distributed and not env.is_main
    assert DistEnv.from_environ({}).is_main
    with pytest.raises(UsageError, match="malformed"):
        DistEnv.from_environ({"WORLD_SIZE": "two"})


@pytest.mark.parametrize(
    "effective, micro, world, expected",
    [
        (32, 4, 1, (4, 8)),
        (32, 4, 2, (4, 4)),
        (32, 4, 8, (4, 1)),
        (64, 64, 8, (8, 1)),
        (24, 5, 2, (4, 3)),
    ],
)
def test_split_keeps_the_effective_batch(effective, micro, world, expected):
    m, accum = split_batch(effective, micro, world)
    assert (m, accum) == expected
    assert m * accum * world == effective


def test_split_refuses_uneven_world():
    with pytest.raises(UsageError, match="evenly"):
        split_batch(30, 4, 4)


def test_fsdp_needs_two_ranks():
    check_strategy("ddp", 1)
    check_strategy("fsdp", 2)
    with pytest.raises(UsageError, match="at least 2"):
        check_strategy("fsdp", 1)
    with pytest.raises(UsageError, match="unknown strategy"):
        check_strategy("zero3", 2)


def test_shard_units_cover_the_big_modules():
    import torch

    from ehrplan.runtime.models import build_model

    for name, expected in (("tiny-lstm", 3), ("tiny-transformer", 4)):
        with torch.device("meta"):
            model = build_model(get_preset(name).config)
        # lstm: code embeddings, visit LSTM, sequence LSTM;
        # transformer: code and position embeddings, two blocks
        assert len(shard_blocks(model)) == expected


def test_torchrun_argv():
    argv = torchrun_argv(2, ["train", "--preset", "tiny"])
    assert "--nproc-per-node=2" in argv and argv[-3:] == ["train", "--preset", "tiny"]
    with pytest.raises(UsageError):
        torchrun_argv(0, [])


def _env(rank, world):
    return DistEnv(rank=rank, world_size=world, local_rank=rank)


def test_rank_share_gives_each_rank_the_single_process_micro_batches():
    group = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    shares = [rank_share(group, 4, 2, _env(r, 2)) for r in range(2)]
    assert shares[0] == ([[0, 1, 2, 3], [4, 5, 6, 7]], 4)
    assert shares[1] == ([[8, 9, 10, 11], [12, 13, 14, 15]], 4)
    # a smaller per-rank micro-batch cuts each micro-batch, never mixes two
    mine, n = rank_share([[0, 1, 2, 3], [4, 5]], 2, 1, _env(2, 4))
    assert (mine, n) == ([[4, 5]], 3)
    # an epoch's short last group: the last rank gets an empty micro-batch
    assert rank_share([[0, 1, 2]], 4, 1, _env(1, 2)) == ([[]], 1)
    # one process: the group itself
    assert rank_share(group, 8, 2, DistEnv()) == (group, 4)


def test_rank_share_covers_every_patient_once():
    group = [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]  # micro 6 x 2, world 3: micro 4
    got = [rank_share(group, 4, 1, _env(r, 3))[0] for r in range(3)]
    assert sorted(i for share in got for b in share for i in b) == list(range(12))


def test_resume_rules():
    assert check_resume({"strategy": "ddp", "world_size": 2}, "ddp", _env(0, 2)) is None
    assert "not bit-identical" in check_resume(
        {"strategy": "ddp", "world_size": 2}, "ddp", _env(0, 4)
    )
    assert check_resume(None, "ddp", _env(0, 2)) is not None  # single -> DDP: allowed
    assert check_resume({"strategy": "fsdp", "world_size": 2}, "fsdp", _env(1, 2)) is None
    with pytest.raises(UsageError, match="on 2 processes"):
        check_resume({"strategy": "fsdp", "world_size": 2}, "fsdp", _env(0, 4))
    with pytest.raises(UsageError, match="on 2 processes"):
        check_resume({"strategy": "fsdp", "world_size": 2}, "ddp", DistEnv())
    with pytest.raises(UsageError, match="without FSDP"):
        check_resume({"strategy": "ddp", "world_size": 2}, "fsdp", _env(0, 2))
