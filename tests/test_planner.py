"""Sizes, the hardware catalog, budgets, and the planner's recommendation and changes."""

from __future__ import annotations

from dataclasses import replace
from itertools import product
from typing import Any

import pytest
from pydantic import ValidationError

from ehrplan.errors import ConfigError, UsageError
from ehrplan.plan import planner
from ehrplan.plan.catalog import CatalogDevice, get_target, load_catalog
from ehrplan.plan.config import EHRModelConfig, get_preset, load_presets
from ehrplan.plan.estimator import MemoryEstimate, estimate_memory
from ehrplan.plan.hardware import CUDA_CONTEXT_ALLOWANCE, GIB, MIB
from ehrplan.plan.levels import process_fit_bytes
from ehrplan.plan.planner import (
    budget_from_size,
    budget_from_target,
    cheapest_fix,
    plan,
    precision_for,
)
from ehrplan.plan.units import parse_size

# --------------------------------------------------------------------------------------------
# sizes


@pytest.mark.parametrize(
    ("text", "expected", "unit"),
    [
        ("16GB", 16 * 10**9, "GB"),
        ("16gb", 16 * 10**9, "GB"),
        ("16GiB", 16 * 2**30, "GiB"),
        ("24g", 24 * 2**30, "GiB"),
        ("24G", 24 * 2**30, "GiB"),
        ("1.5GiB", 3 * 2**29, "GiB"),
        ("512MiB", 512 * 2**20, "MiB"),
        ("500MB", 500 * 10**6, "MB"),
        ("1TB", 10**12, "TB"),
        ("8000000000", 8 * 10**9, "bytes"),
        (" 80 GiB ", 80 * 2**30, "GiB"),
    ],
)
def test_parse_size(text: str, expected: int, unit: str) -> None:
    s = parse_size(text)
    assert s.bytes == expected and s.unit == unit
    assert f"{expected:,} bytes" in s.reading


@pytest.mark.parametrize("text", ["", "GB", "12xb", "0GB", "-1GB", "1e9", "16 G B"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_size_reading_names_the_convention() -> None:
    assert "binary" in parse_size("24g").reading
    assert "decimal" in parse_size("16GB").reading


# --------------------------------------------------------------------------------------------
# catalog

REQUIRED = [
    "m1-8gb", "m1-16gb", "m1-pro-16gb", "m1-pro-32gb", "m1-max-32gb", "m1-max-64gb",
    "m2-8gb", "m2-16gb", "m2-24gb", "m3-8gb", "m3-16gb", "m3-24gb",
    "t4", "l4", "a10", "a10g", "rtx-3090", "rtx-4090", "a40", "l40s",
    "a100-40gb", "a100-80gb", "h100-80gb", "h200",
]  # fmt: skip


def test_catalog_has_every_required_machine() -> None:
    assert set(REQUIRED) <= set(load_catalog())


@pytest.mark.parametrize("name", REQUIRED)
def test_catalog_rows_are_sane(name: str) -> None:
    row = get_target(name)
    assert row.source and row.bandwidth_gbs > 0
    if row.kind == "nvidia":
        # what NVML reports can't exceed what is sold, and is not far below it (ECC: 1/16)
        assert row.reported_total_mib is not None
        assert 0.9 * row.memory_gib * 1024 <= row.reported_total_mib <= row.memory_gib * 1024
        assert row.usable_bytes == row.reported_total_mib * MIB - CUDA_CONTEXT_ALLOWANCE
    else:
        assert row.usable_bytes < row.memory_bytes  # Metal's working set, not all of it
    if row.half_tflops and row.fp32_tflops:
        assert row.half_tflops >= row.fp32_tflops


def test_catalog_lookup_lists_valid_names_and_forgives_case() -> None:
    assert get_target("A100_40GB").name == "a100-40gb"
    with pytest.raises(ConfigError, match=r"valid targets: .*a10, a10g"):
        get_target("a1000")


def test_catalog_rows_forbid_unknown_keys_and_are_frozen() -> None:
    good: dict[str, Any] = get_target("a10").model_dump()
    with pytest.raises(ValidationError):
        CatalogDevice.model_validate({**good, "tflops": 1})
    no_total = {**good, "reported_total_mib": None}
    with pytest.raises(ValidationError):
        CatalogDevice.model_validate(no_total)
    with pytest.raises(ValidationError):
        get_target("a10").memory_gib = 1  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# budgets and precision


def test_budgets_from_targets() -> None:
    a10 = budget_from_target("a10", headroom=0.1)
    assert a10.usable_bytes == 23028 * MIB - CUDA_CONTEXT_ALLOWANCE
    assert a10.budget_bytes == int(a10.usable_bytes * 0.9)
    assert a10.device == "cuda" and a10.target.native_half == "bf16"
    m1 = budget_from_target("m1-16gb", headroom=0.0)
    assert m1.device == "mps" and m1.usable_bytes == int(16 * GIB * 2 / 3)
    assert m1.target.native_half == "fp16"
    assert budget_from_target("t4").target.native_half == "fp16"


@pytest.mark.parametrize("headroom", [-0.1, 1.0, 2.0])
def test_bad_headroom(headroom: float) -> None:
    with pytest.raises(UsageError):
        budget_from_target("a10", headroom=headroom)


def test_gpus_on_a_mac_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        budget_from_target("m1-16gb", gpus=2)


def test_precision_rule() -> None:
    mixed = get_preset("small-lstm").config
    fp32 = get_preset("tiny-lstm").config
    assert mixed.mixed_precision and not fp32.mixed_precision
    assert precision_for(mixed, budget_from_target("a100-40gb")).precision == "bf16"
    assert precision_for(mixed, budget_from_target("m1-16gb")).precision == "fp16"
    assert precision_for(mixed, budget_from_target("t4")).precision == "fp16"
    assert precision_for(fp32, budget_from_target("a100-40gb")).precision == "fp32"
    # a declared CPU: native bf16 unknown, so fp32 (--precision bf16 asks for it)
    cpu = budget_from_size(parse_size("8GB"), device="cpu")
    assert precision_for(mixed, cpu).precision == "fp32"
    assert precision_for(mixed, replace(cpu, precision="bf16")).precision == "bf16"


# --------------------------------------------------------------------------------------------
# the recommendation, checked against the estimator itself


def _every_change(config: EHRModelConfig) -> list[dict[str, Any]]:
    """Every combination of the changes the planner may try (independently enumerated)."""
    eff = config.effective_batch_size
    # every smaller micro-batch that keeps the effective batch (a superset of the planner's)
    batches = [{}] + [
        {"batch_size": b, "gradient_accumulation_steps": eff // b}
        for b in range(1, config.batch_size)
        if eff % b == 0
    ]
    ckpt = [{}, {"use_checkpoint": True}]
    mixed = [{}, {"mixed_precision": True}]
    return [{**a, **b, **c} for a, b, c in product(batches, ckpt, mixed)]


def _live_only(device: str, live: int, *_: Any, **__: Any) -> tuple[int, str, list[str]]:
    """The toy estimators' bytes as they are (no process-level terms on top)."""
    return live, "toy", []


def _estimate(config: EHRModelConfig, budget: planner.Budget) -> int:
    """What the planner compares with the budget: the process level (ehrplan.plan.levels)."""
    precision = precision_for(config, budget).precision
    est = estimate_memory(
        config,
        precision=precision,
        device=budget.device,
        batch_size=config.batch_size,
        checkpointing=config.use_checkpoint,
    )
    return process_fit_bytes(budget.device, est.total_bytes, est.lstm_gate_bytes)[0]


@pytest.mark.parametrize("target", ["m1-16gb", "a10", "a100-40gb"])
def test_recommendation_is_the_largest_that_fits(target: str) -> None:
    budget = budget_from_target(target, headroom=0.1)
    p = plan(budget)
    for t in ("lstm", "transformer"):
        names = [n for n, pr in load_presets().items() if pr.config.model_type == t]
        rec = p["recommendation"][t]
        assert rec is not None
        cfg = get_preset(rec["preset"]).config
        changed = EHRModelConfig.model_validate({**cfg.model_dump(), **rec["changes"]})
        assert rec["estimate_bytes"] == _estimate(changed, budget) <= budget.budget_bytes
        if rec["changes"]:
            assert changed.effective_batch_size == cfg.effective_batch_size
        # nothing larger fits, with any combination of the changes, except what the time rule
        # excluded (it fits memory, but an epoch takes longer than the limit)
        slow = {x["preset"]: x for x in p["excluded_by_time"][t]}
        for x in slow.values():
            assert x["seconds_per_epoch"] > budget.max_epoch_hours * 3600
        for bigger in names[names.index(rec["preset"]) + 1 :]:
            if bigger in slow:
                continue
            big = get_preset(bigger).config
            for ch in _every_change(big):
                c = EHRModelConfig.model_validate({**big.model_dump(), **ch})
                assert _estimate(c, budget) > budget.budget_bytes, (bigger, ch)
    for row in p["presets"]:
        cfg = get_preset(row["preset"]).config
        assert row["estimate_bytes"] == _estimate(cfg, budget)
        assert row["fits"] == (row["estimate_bytes"] <= budget.budget_bytes)


@pytest.mark.parametrize("target", ["m1-16gb", "a10", "a100-40gb", "t4"])
def test_seed_check_is_consistent_with_the_rows(target: str) -> None:
    p = plan(budget_from_target(target))
    rows = {r["preset"]: r for r in p["presets"]}
    for t in ("lstm", "transformer"):
        s = p["seed_check"][t]
        if s["seed_tier"] is None:
            assert target == "t4" and s["agrees"] is None
            continue
        seed = rows[s["seed_preset"]]
        largest = [r["preset"] for r in p["presets"] if r["model_type"] == t and r["fits"]][-1]
        assert s["agrees"] == (seed["fits"] and largest == s["seed_preset"])


def test_device_caveats_travel_with_the_plan() -> None:
    cuda = plan(budget_from_target("a10"))
    assert any("CUDA path unmeasured" in n for n in cuda["estimate_notes"])
    cpu = plan(budget_from_size(parse_size("16GiB"), device="cpu"))
    assert not any("CUDA" in n for n in cpu["estimate_notes"])


# --------------------------------------------------------------------------------------------
# the cheapest change, with a stand-in estimator whose activations scale with the micro-batch


def _toy_estimator(per_sample: int, static: int):
    """Static memory + activations per sample; checkpointing keeps 1/4; mixed halves them."""

    def estimate(
        config: EHRModelConfig,
        *,
        precision: str = "fp32",
        device: str = "cpu",
        batch_size: int | None = None,
        checkpointing: bool | None = None,
    ) -> MemoryEstimate:
        b = batch_size if batch_size is not None else config.batch_size
        ckpt = config.use_checkpoint if checkpointing is None else checkpointing
        act = per_sample * b // (4 if ckpt else 1) // (1 if precision == "fp32" else 2)
        return MemoryEstimate(
            precision=precision,
            device=device,
            batch_size=b,
            checkpointing=ckpt,
            breakdown={"parameters": static, "activations": act},
        )

    return estimate


def _cfg(**kw: Any) -> EHRModelConfig:
    base = get_preset("medium-lstm").config.model_dump()
    base.update(mixed_precision=False, use_checkpoint=False, batch_size=32)
    base.update(gradient_accumulation_steps=2, **kw)
    return EHRModelConfig.model_validate(base)


@pytest.mark.parametrize(
    ("budget_gib", "expected"),
    [
        (20, {"batch_size": 16, "gradient_accumulation_steps": 4}),  # halving is enough
        (5, {"batch_size": 4, "gradient_accumulation_steps": 16}),  # before checkpointing
        (1.5, {"use_checkpoint": True, "batch_size": 2, "gradient_accumulation_steps": 32}),
        (2, {"batch_size": 1, "gradient_accumulation_steps": 64}),
    ],
)
def test_cheapest_fix_order(
    monkeypatch: pytest.MonkeyPatch, budget_gib: float, expected: dict[str, Any]
) -> None:
    # 1 GiB static + 1 GiB per sample: batch 32 needs 33 GiB
    monkeypatch.setattr(planner, "estimate_memory", _toy_estimator(GIB, GIB))
    monkeypatch.setattr(planner, "process_fit_bytes", _live_only)
    budget = budget_from_size(parse_size(f"{budget_gib}GiB"), headroom=0.0)
    fix = cheapest_fix(_cfg(), budget, "toy")
    assert fix is not None and fix.changes == expected
    assert fix.fit.fits and fix.fit.config.effective_batch_size == 64
    assert fix.description  # named for the output


def test_cheapest_fix_reaches_mixed_precision_last(monkeypatch: pytest.MonkeyPatch) -> None:
    # 1 GiB static + 4 GiB per sample: even batch 1 with checkpointing (2 GiB) needs more than
    # the 1.8 GiB budget; mixed precision halves activations -> 1.5 GiB fits
    monkeypatch.setattr(planner, "estimate_memory", _toy_estimator(4 * GIB, GIB))
    monkeypatch.setattr(planner, "process_fit_bytes", _live_only)
    budget = budget_from_size(parse_size("1.8GiB"), headroom=0.0)
    fix = cheapest_fix(_cfg(), budget, "toy")
    assert fix is not None and fix.changes.get("precision") == "bf16"
    assert fix.fit.precision == "bf16" and "--precision bf16" in fix.flags
    assert cheapest_fix(_cfg(), budget_from_size(parse_size("1GiB"), headroom=0.0), "t") is None


def test_plan_names_the_change_for_the_next_size_up(monkeypatch: pytest.MonkeyPatch) -> None:
    # with activations per sample proportional to parameters, large does not fit 24 GiB as
    # shipped; the plan must recommend what fits and name a change for the next size up
    def est(config: EHRModelConfig, **kw: Any) -> MemoryEstimate:
        b = kw.get("batch_size") or config.batch_size
        ckpt = kw.get("checkpointing")
        n = config.total_params
        act = n * 40 * b // (4 if ckpt else 1)
        return MemoryEstimate(
            precision="fp32",
            device="cuda",
            batch_size=b,
            checkpointing=bool(ckpt),
            breakdown={"p": 16 * n, "activations": act},
        )

    monkeypatch.setattr(planner, "estimate_memory", est)

    monkeypatch.setattr(planner, "process_fit_bytes", _live_only)
    p = plan(budget_from_size(parse_size("24GiB"), headroom=0.1), ["lstm"])
    rows = {r["preset"]: r for r in p["presets"]}
    rec = p["recommendation"]["lstm"]
    assert rec is not None
    up = p["next_size_up"]["lstm"]
    assert up is not None and not rows[up["preset"]]["fits"]
    if up["fits_after_change"]:
        assert rec["preset"] == up["preset"] and rec["change"] == up["change"]
        assert up["estimate_after_change_bytes"] <= p["budget"]["budget_bytes"]


def test_data_parallel_accumulation() -> None:
    cfg = get_preset("small-lstm").config  # batch 4 x 8 accumulation = 32
    p = plan(budget_from_target("a100-40gb", gpus=4), ["lstm"])
    row = next(r for r in p["presets"] if r["preset"] == "small-lstm")
    assert row["data_parallel_accumulation"] * cfg.batch_size * 4 == cfg.effective_batch_size
    assert p["budget"]["gpus"] == 4
    large = next(r for r in p["presets"] if r["preset"] == "large-lstm")  # 64 x 1 on 4 GPUs
    dp = large["data_parallel"]
    assert dp["keeps_effective_batch"] and dp["batch_size"] * 4 == large["effective_batch_size"]
    assert dp["batch_size"] <= large["batch_size"]


# --------------------------------------------------------------------------------------------
# --auto: room in the budget spent on speed


def _speed(budget_bytes: int, changes: dict[str, Any] | None = None) -> tuple[Any, list[str]]:
    from ehrplan.runtime.training.choose import spend_room_on_speed

    budget = budget_from_size(parse_size(f"{budget_bytes}B"), headroom=0.0, device="cpu")
    reasons: list[str] = []
    cfg = get_preset("small-lstm").config  # 4 x 8, checkpointing on
    return spend_room_on_speed(cfg, budget, "small-lstm", reasons, dict(changes or {})), reasons


def _peak(**update: Any) -> int:
    """The fp32 process-level peak: what `ehrplan train` trains in on the CPU, and what --auto
    checks."""
    cfg = get_preset("small-lstm").config.model_copy(update=update)
    est = estimate_memory(cfg, precision="fp32", device="cpu")
    return process_fit_bytes("cpu", est.total_bytes, est.lstm_gate_bytes)[0]


def test_auto_with_room_turns_checkpointing_off_and_folds_accumulation() -> None:
    cfg, reasons = _speed(64 * GIB)
    assert (cfg.batch_size, cfg.gradient_accumulation_steps, cfg.use_checkpoint) == (32, 1, False)
    assert cfg.effective_batch_size == get_preset("small-lstm").config.effective_batch_size
    assert len(reasons) == 2 and "checkpointing off" in reasons[0] and "32 x 1" in reasons[1]


def test_auto_takes_the_largest_micro_batch_that_fits() -> None:
    plain = {"use_checkpoint": False}
    room = _peak(batch_size=16, gradient_accumulation_steps=2, **plain)
    assert room < _peak(batch_size=32, gradient_accumulation_steps=1, **plain)
    cfg, _ = _speed(room)
    assert (cfg.batch_size, cfg.gradient_accumulation_steps) == (16, 2)


def test_auto_without_room_keeps_the_micro_batch() -> None:
    # the preset as written, exactly (an LSTM's peak is the same with checkpointing off)
    cfg, reasons = _speed(_peak(use_checkpoint=True))
    assert (cfg.batch_size, cfg.gradient_accumulation_steps) == (4, 8)
    assert all("accumulation ->" not in r for r in reasons)
    cfg, reasons = _speed(_peak(use_checkpoint=True) - 1)
    assert cfg == get_preset("small-lstm").config and reasons == []


def test_auto_keeps_a_memory_fix_of_the_micro_batch() -> None:
    fix = {"batch_size": 2, "gradient_accumulation_steps": 16}
    cfg, reasons = _speed(64 * GIB, fix)
    assert cfg.gradient_accumulation_steps == 8  # the fold does not undo recommend's change
    assert all("accumulation ->" not in r for r in reasons)
