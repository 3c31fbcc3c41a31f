"""`recommend --json` and `validate --json`: a budget and configs against it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ehrplan.cli.schemas.base import ByTerm, Doc, Out
from ehrplan.cli.schemas.estimate import ParallelEstimate, TimeEstimate
from ehrplan.plan.config import ModelType


class Budget(Out):
    """The memory budget a config is checked against."""

    label: str
    source: str = Field(description="probe, catalog or declared.")
    device: str
    gpus: int
    strategy: str = Field(description="single, ddp or fsdp.")
    nominal_bytes: int | None
    usable_bytes: int
    headroom: float
    budget_bytes: int = Field(description="usable_bytes x (1 - headroom).")
    mixed_precision_dtype: str = Field(description="What mixed precision means on this device.")
    notes: list[str]


class Fit(Out):
    """One config against the budget."""

    name: str
    model_type: ModelType
    precision: str
    batch_size: int
    gradient_accumulation_steps: int
    effective_batch_size: int
    checkpointing: bool
    estimate_bytes: int = Field(description="Estimated peak per device.")
    estimate_notes: list[str]
    budget_bytes: int
    fits: bool
    shortfall_bytes: int
    breakdown: ByTerm
    per_gpu_bytes: int
    job_bytes: int
    parallel: ParallelEstimate | None
    time: TimeEstimate | None


class ConfigChanges(Out):
    """The config fields a suggested change sets (only those it sets)."""

    batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    use_checkpoint: bool | None = None
    mixed_precision: bool | None = None


class Adjustment(Fit):
    """A named change to a config and its re-estimated fit."""

    description: str
    changes: ConfigChanges


class DataParallel(Out):
    batch_size: int
    gradient_accumulation_steps: int
    effective_batch_size: int
    keeps_effective_batch: bool


class PresetFit(Fit):
    preset: str
    size: str
    seed_target: str
    fits_after_change: Adjustment | None
    data_parallel_accumulation: int | None
    data_parallel: DataParallel


class Recommendation(Out):
    preset: str
    change: str | None
    changes: ConfigChanges
    precision: str
    estimate_bytes: int
    job_bytes: int
    budget_bytes: int
    time: TimeEstimate | None


class NextSizeUp(Out):
    preset: str
    estimate_bytes: int
    shortfall_bytes: int
    change: str | None
    changes: ConfigChanges | None
    estimate_after_change_bytes: int | None
    fits_after_change: bool


class SeedCheck(Out):
    seed_tier: str | None
    seed_preset: str | None = Field(None, description="Absent where the seed names no tier.")
    agrees: bool | None
    statement: str


class RecommendOut(Doc):
    command: Literal["recommend"]
    budget: Budget
    model_types: list[ModelType]
    presets: list[PresetFit]
    recommendation: dict[ModelType, Recommendation | None]
    next_size_up: dict[ModelType, NextSizeUp | None]
    seed_check: dict[ModelType, SeedCheck]
    estimate_notes: list[str]


class ValidateOut(Doc):
    command: Literal["validate"]
    budget: Budget
    results: list[Fit] = Field(description="One per config, in the order given.")
    ok: bool = Field(description="Every config fits (exit 0).")
    estimate_notes: list[str]
