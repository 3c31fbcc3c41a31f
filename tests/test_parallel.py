"""Per-GPU memory of DDP/FSDP and the time estimate (analytic; measured in benchmarks/)."""

from __future__ import annotations

import math

import pytest

from ehrplan.errors import UsageError
from ehrplan.plan.catalog import get_target
from ehrplan.plan.config import get_preset, load_presets
from ehrplan.plan.estimator import estimate_memory, largest_updated_tensor
from ehrplan.plan.flops import training_step_flops
from ehrplan.plan.params import count_parameters
from ehrplan.plan.per_gpu import (
    _dynamic_phases,
    catalog_tflops,
    estimate_parallel,
    estimate_time,
    shard_units,
    split_batch,
)

PRESETS = sorted(load_presets())


def test_one_process_is_the_estimator():
    c = get_preset("tiny-lstm").config
    pe = estimate_parallel(c, world_size=1, device="cpu")
    assert pe.strategy == "single"
    assert pe.per_device_bytes == estimate_memory(c).total_bytes
    with pytest.raises(UsageError, match="at least 2"):
        estimate_parallel(c, world_size=1, strategy="fsdp", device="cpu")
    with pytest.raises(UsageError, match="unknown strategy"):
        estimate_parallel(c, world_size=2, strategy="zero2", device="cpu")


@pytest.mark.parametrize("name", PRESETS)
def test_ddp_holds_a_replica_and_buckets_in_every_phase(name):
    c = get_preset(name).config
    P = count_parameters(c).total
    pe = estimate_parallel(c, world_size=2, strategy="ddp", device="cuda", precision="bf16")
    b = pe.breakdown
    # the replica (4P), Adam (8P) and the buckets the gradients are views of (4P, not 8P)
    assert b["parameters"] == b["gradient_buckets"] == 4 * P
    assert b["optimizer_state"] == 8 * P
    micro, accum = split_batch(c.effective_batch_size, c.batch_size, 2)
    assert (pe.micro_batch, pe.accumulation) == (micro, accum)
    assert pe.effective_batch == c.effective_batch_size
    # never below one device running the same micro-batch (which has no gradients in its
    # first forward) and never above it plus a second set of gradients and the embedding's
    one = c.model_copy(update={"batch_size": micro, "gradient_accumulation_steps": accum})
    single = estimate_memory(one, precision="bf16", device="cuda").total_bytes
    emb = c.vocab_size * c.code_embed_dim
    assert single <= pe.per_device_bytes <= single + 4 * P + 4 * emb
    assert pe.job_bytes == 2 * pe.per_device_bytes


@pytest.mark.parametrize("name", PRESETS)
def test_fsdp_shards_static_state(name):
    c = get_preset(name).config
    P = count_parameters(c).total
    ddp = estimate_parallel(c, world_size=8, strategy="ddp", device="cuda")
    fsdp = estimate_parallel(c, world_size=8, strategy="fsdp", device="cuda")
    f = fsdp.moments
    assert fsdp.breakdown["parameters_sharded"] == 4 * P // 8
    assert fsdp.breakdown["optimizer_state_sharded"] == 8 * P // 8
    # FSDP's units in flight are a part of the model: sharding never costs more than DDP here
    assert fsdp.per_device_bytes < ddp.per_device_bytes
    # ... and saves at least the sharded static state less what is all-gathered at a time
    units = shard_units(c)
    gathered = units["root"] + sum(sorted(units.values())[-3:])
    assert ddp.per_device_bytes - fsdp.per_device_bytes >= 12 * P * 7 // 8 - 4 * 3 * gathered
    assert set(f) >= {"optimizer", "forward"}


def test_more_ranks_less_memory_per_rank_for_fsdp():
    c = get_preset("medium-transformer").config
    per = [
        estimate_parallel(c, world_size=w, strategy="fsdp", device="cuda").per_device_bytes
        for w in (2, 4, 8)
    ]
    assert per[0] > per[1] > per[2]


@pytest.mark.parametrize("name", ["tiny-lstm", "tiny-transformer", "small-transformer"])
def test_units_and_largest_tensor_match_the_built_model(name):
    import torch

    from ehrplan.runtime.distributed import shard_blocks
    from ehrplan.runtime.models import build_model

    c = get_preset(name).config
    with torch.device("meta"):
        model = build_model(c)
    blocks = shard_blocks(model)
    units = shard_units(c)
    counted = sorted(sum(p.numel() for p in b.parameters()) for b in blocks)
    assert counted == sorted(v for k, v in units.items() if k != "root")
    assert sum(units.values()) == sum(p.numel() for p in model.parameters())
    assert largest_updated_tensor(c) == max(p.numel() for p in model.parameters())
    # a frozen table is not updated: Adam's temporaries are the largest trainable tensor's size
    frozen = c.model_copy(update={"freeze_embeddings": True})
    table = model.encoder.code_embeddings.weight
    others = [p.numel() for p in model.parameters() if p is not table]
    assert largest_updated_tensor(frozen) == max(others)


def test_dynamic_part_takes_out_exactly_the_static_state():
    # small-transformer's peak is Adam's step: inputs + the two temporaries of the largest tensor
    c = get_preset("small-transformer").config
    dyn, *_ = _dynamic_phases(c, c.batch_size, "fp32", "cpu", None, "mkldnn")
    est = estimate_memory(c)
    assert est.peak_phase == "optimizer"
    assert dyn["optimizer"] - 8 * largest_updated_tensor(c) == est.breakdown["inputs"]


def test_gloo_copies_the_reduce_scatter_input():
    c = get_preset("tiny-lstm").config.model_copy(update={"vocab_size": 20000})
    g = estimate_parallel(c, world_size=2, strategy="fsdp", device="cpu", backend="gloo")
    n = estimate_parallel(c, world_size=2, strategy="fsdp", device="cpu", backend="nccl")
    emb = 4 * c.vocab_size * c.code_embed_dim
    assert g.moments["embedding_reduce_scatter"] - n.moments["embedding_reduce_scatter"] == emb


# ---------------------------------------------------------------------------------------------
# time


def test_time_is_flops_over_sustained_throughput():
    c = get_preset("small-lstm").config
    t1 = estimate_time(c, peak_tflops=100.0, utilisation=0.5, patients=1000)
    flops = training_step_flops(c).per_optimizer_step
    assert t1.flops_per_step_per_device == flops
    assert math.isclose(t1.seconds_per_step, flops / 50e12)
    assert t1.steps_per_epoch == math.ceil(1000 / c.effective_batch_size)
    assert math.isclose(t1.seconds_per_epoch, t1.seconds_per_step * t1.steps_per_epoch)
    # eight ranks: each does an eighth of the step's patients, in parallel
    t8 = estimate_time(c, peak_tflops=100.0, utilisation=0.5, world_size=8)
    assert math.isclose(t8.seconds_per_step * 8, t1.seconds_per_step)
    with pytest.raises(UsageError, match="utilisation"):
        estimate_time(c, peak_tflops=100.0, utilisation=1.5)


def test_catalog_throughput_by_precision():
    a100 = get_target("a100-40gb")
    assert catalog_tflops(a100, "bf16")[0] == a100.half_tflops
    assert catalog_tflops(a100, "fp32")[0] == a100.fp32_tflops
    with pytest.raises(UsageError, match="no throughput"):
        catalog_tflops(get_target("m3-16gb"), "fp32")


# ---------------------------------------------------------------------------------------------
# the commands


def test_recommend_answers_per_gpu_and_for_the_job(cli):
    import json

    r = cli("recommend", "--target", "a100-40gb", "--gpus", "8", "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["budget"]["gpus"] == 8 and p["budget"]["strategy"] == "ddp"
    rec = p["recommendation"]["lstm"]
    assert rec["job_bytes"] == 8 * rec["estimate_bytes"]
    row = next(x for x in p["presets"] if x["preset"] == rec["preset"])
    # fit is decided on the process level: the per-GPU live peak plus scratch, reserve, context
    assert row["parallel"]["per_device_bytes"] < row["estimate_bytes"]
    assert row["time"]["seconds_per_step"] > 0


def test_estimate_and_validate_take_gpus_and_strategy(cli):
    import json

    r = cli("estimate", "--preset", "tiny", "--gpus", "2", "--strategy", "fsdp", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["parallel"]
    want = estimate_parallel(get_preset("tiny").config, world_size=2, strategy="fsdp", device="cpu")
    assert got["per_device_bytes"] == want.per_device_bytes
    v = cli("validate", "tiny", "--budget", "1GiB", "--gpus", "2", "--strategy", "fsdp")
    assert v.returncode == 0, v.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("recommend", "--target", "a100-40gb", "--strategy", "fsdp"),
        ("estimate", "--preset", "tiny", "--strategy", "fsdp"),
        ("estimate", "--preset", "tiny", "--gpus", "2", "--strategy", "zero3"),
    ],
)
def test_fsdp_on_one_device_is_refused(cli, args):
    r = cli(*args)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error:")


@pytest.mark.parametrize(
    "args",
    [
        [
            "estimate",
            "--preset",
            "tiny",
            "--gpus",
            "8",
            "--strategy",
            "fsdp",
            "--target",
            "a100-40gb",
        ],
        ["recommend", "--target", "a100-40gb", "--gpus", "8", "--strategy", "fsdp", "--json"],
        ["validate", "tiny", "--budget", "1GiB", "--gpus", "2", "--strategy", "fsdp"],
    ],
)
def test_plans_over_gpus_never_import_torch(args):
    from conftest import run_without_torch

    code, _, err = run_without_torch(args)
    assert code == 0, err


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_length_groups_reach_the_per_rank_estimate(strategy):
    """A data-shaped micro-batch's within-visit groups shrink each rank's estimate like the
    single-process one (the trainer logs them under torchrun); under FSDP the model runs that
    LSTM ungrouped (one all-gather per call would differ by rank), so the groups are ignored."""
    c = get_preset("small-lstm").config
    groups = [(20, 30), (60, 12), (40, 3)]  # 120 real visits of a 4 x 40 x 30 batch
    kw = {"world_size": 2, "strategy": strategy, "device": "cpu", "micro_batch": 4}
    kw |= {"accumulation": 4, "visits": 40, "codes": 30}
    full = estimate_parallel(c, **kw).per_device_bytes
    grouped = estimate_parallel(c, visit_groups=groups, **kw).per_device_bytes
    if strategy == "fsdp":
        assert grouped == full
    else:
        assert grouped < full
    one = {"world_size": 1, "device": "cpu", "micro_batch": 4, "accumulation": 8}
    single = estimate_parallel(c, visit_groups=groups, visits=40, codes=30, **one)
    cfg = c.model_copy(update={"batch_size": 4, "gradient_accumulation_steps": 8})
    direct = estimate_memory(cfg, device="cpu", visits=40, codes=30, visit_groups=groups)
    assert single.per_device_bytes == direct.total_bytes
