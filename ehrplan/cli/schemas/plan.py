"""`recommend --json` and `validate --json`: a budget and configs against it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ehrplan.cli.schemas.base import ByTerm, Doc, Out
from ehrplan.cli.schemas.estimate import DeviceTarget, ParallelEstimate, TimeEstimate
from ehrplan.cli.schemas.tasks import DataRecommendation, DataShaped, DataSource
from ehrplan.plan.config import ModelType


class TimeRule(Out):
    patients: int = Field(description="Training patients per epoch (--patients).")
    max_epoch_hours: float = Field(description="--max-epoch-hours.")


class Budget(Out):
    """The memory budget a config is checked against."""

    label: str = Field(description="What the budget is, in words.")
    source: str = Field(description="probe, catalog or declared.")
    device: str = Field(description="cuda, mps or cpu.")
    gpus: int = Field(description="Data-parallel devices; bytes are per device.")
    strategy: str = Field(description="single, ddp or fsdp.")
    nominal_bytes: int | None = Field(description="The memory as declared or listed, if any.")
    total_bytes: int | None = Field(
        description="Host RAM (or the cgroup limit): what the machine has; null off the CPU."
    )
    usable_bytes: int = Field(
        description="What a training step may use, before headroom (CPU: RAM available now, "
        "cgroup-aware)."
    )
    headroom: float = Field(description="Fraction of usable memory kept free.")
    budget_bytes: int = Field(description="usable_bytes x (1 - headroom) - data_bytes.")
    data_bytes: int = Field(
        description="With --data: the host RAM a training process needs for that data set's "
        "example cache (mapped pages and in-memory arrays), taken out of the budget on the CPU "
        "and on unified-memory Apple Silicon; 0 otherwise."
    )
    mixed_precision_dtype: str = Field(description="What mixed precision means on this device.")
    target: DeviceTarget
    precision_requested: str | None = Field(description="--precision, or null (the rule).")
    device_key: str | None = Field(description="This machine's device, for measured rates.")
    time_rule: TimeRule
    notes: list[str]


class Fit(Out):
    """One config against the budget."""

    name: str = Field(description="The config as given: a file, a run folder or a preset.")
    model_type: ModelType
    device: str = Field(description="cuda, mps or cpu.")
    precision: str = Field(description="Precision estimated: fp32, bf16 or fp16.")
    precision_reason: str = Field(description="Why this precision on this device.")
    batch_size: int
    gradient_accumulation_steps: int
    effective_batch_size: int
    checkpointing: bool
    estimate_bytes: int = Field(description="Estimated peak per device.")
    estimate_notes: list[str] = Field(description="The estimator's caveats for this device.")
    budget_bytes: int
    fits: bool = Field(description="estimate_bytes <= budget_bytes.")
    shortfall_bytes: int = Field(description="How much is missing (0 when it fits).")
    breakdown: ByTerm = Field(description="The peak's bytes by what holds them.")
    per_gpu_bytes: int
    job_bytes: int = Field(description="Every device of the job together.")
    parallel: ParallelEstimate | None = Field(description="Over several devices (gpus > 1).")
    time: TimeEstimate | None = Field(description="Where the budget has a peak throughput.")
    data_shaped: DataShaped | None = Field(
        None, description="--data: the estimate at the data's largest micro-batch."
    )


class ConfigChanges(Out):
    """The config fields a suggested change sets (only those it sets)."""

    batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    use_checkpoint: bool | None = None
    precision: str | None = Field(None, description="The device's mixed precision (--precision).")


class Adjustment(Fit):
    """A named change to a config and its re-estimated fit."""

    description: str
    changes: ConfigChanges
    flags: str = Field(description="The flags of validate/estimate that make the change.")


class DataParallel(Out):
    """Per-GPU micro-batch and accumulation that keep the effective batch over the GPUs."""

    batch_size: int
    gradient_accumulation_steps: int
    effective_batch_size: int
    keeps_effective_batch: bool


class PresetFit(Fit):
    """A preset against the budget, and the cheapest change that makes it fit."""

    preset: str
    size: str
    seed_target: str = Field(description="The machine the seed design names for this preset.")
    fits_after_change: Adjustment | None = Field(description="None if it fits or nothing helps.")
    data_parallel_accumulation: int | None
    data_parallel: DataParallel


class Recommendation(Out):
    """The largest preset of a model type that fits, as shipped or after one change."""

    preset: str
    change: str | None
    changes: ConfigChanges
    flags: str = Field(description="The change as flags to paste ('' as shipped).")
    device: str
    precision: str
    precision_reason: str
    estimate_bytes: int
    job_bytes: int
    budget_bytes: int
    time: TimeEstimate | None
    reason: str = Field(description="Why: memory and time, the words `train --auto` prints.")


class NextSizeUp(Out):
    """The preset after the largest that fits as shipped, and what it would take."""

    preset: str
    estimate_bytes: int
    shortfall_bytes: int
    change: str | None
    changes: ConfigChanges | None
    flags: str | None
    estimate_after_change_bytes: int | None
    fits_after_change: bool


class TooSlow(Out):
    preset: str
    epoch: str | None
    seconds_per_epoch: float | None


class SeedCheck(Out):
    """The seed design's tier for this machine against the estimator."""

    seed_tier: str | None
    seed_preset: str | None = Field(None, description="Absent where the seed names no tier.")
    agrees: bool | None
    statement: str


class RecommendOut(Doc):
    """`ehrplan recommend --json`: every preset against one budget."""

    command: Literal["recommend"]
    budget: Budget
    model_types: list[ModelType]
    presets: list[PresetFit]
    recommendation: dict[ModelType, Recommendation | None]
    next_size_up: dict[ModelType, NextSizeUp | None]
    excluded_by_time: dict[ModelType, list[TooSlow]] = Field(
        description="Presets larger than the recommendation that fit memory but not time."
    )
    time_rule: str
    seed_check: dict[ModelType, SeedCheck]
    data: DataSource | None = None
    data_recommendation: dict[ModelType, DataRecommendation | None] | None = Field(
        None, description="--data: the largest preset whose data-shaped step fits as shipped."
    )
    estimate_notes: list[str] = Field(description="The estimator's caveats, once each.")


class ValidateOut(Doc):
    """`ehrplan validate --json`: the configs given against one budget."""

    command: Literal["validate"]
    budget: Budget
    results: list[Fit] = Field(description="One per config, in the order given.")
    ok: bool = Field(description="Every config fits (exit 0).")
    batch_size_notes: list[str] = Field(
        default_factory=list, description="What --batch-size did to each config."
    )
    estimate_notes: list[str] = Field(description="The estimator's caveats, once each.")
    data: DataSource | None = None
