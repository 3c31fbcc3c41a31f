"""Pure logic of distributed runs: environment, batch split, strategy checks, sharding units."""

from __future__ import annotations

import pytest

from ehrplan.config import get_preset
from ehrplan.distributed import (
    DistEnv,
    check_strategy,
    shard_blocks,
    split_batch,
    torchrun_argv,
)
from ehrplan.errors import UsageError


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

    from ehrplan.models import build_model

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
