"""`estimate --json`; the per-GPU and time estimates that `recommend` and `validate` reuse."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ehrplan.cli.schemas.base import ByTerm, Doc, Out
from ehrplan.plan.config import EHRModelConfig, ModelType


class ParallelEstimate(Out):
    """Memory per device and for the job over several data-parallel devices (DDP or FSDP)."""

    strategy: str
    world_size: int
    backend: str
    micro_batch: int
    accumulation: int
    effective_batch: int
    precision: str
    device: str
    per_device_bytes: int
    job_bytes: int
    peak_moment: str
    breakdown: ByTerm
    moments: ByTerm
    units: ByTerm = Field(description="Parameters of each unit FSDP shards, and of the root.")
    device_overhead: ByTerm
    notes: list[str]


class TimeEstimate(Out):
    """Seconds per optimizer step from a dense peak throughput and an assumed utilisation."""

    flops_per_step_per_device: int
    peak_tflops: float
    utilisation: float
    seconds_per_step: float
    steps_per_epoch: int | None
    seconds_per_epoch: float | None
    patients: int | None
    throughput_source: str = Field(description="Where the rate comes from (`ehrplan.plan.pace`).")
    assumptions: str
    step: str = Field(description="Time per optimizer step in h/min/s.")
    epoch: str = Field(description="Time per epoch of `patients` in h/min/s.")
    rate_measured: bool | None = Field(None, description="recommend: measured on this machine.")
    within_limit: bool | None = Field(None, description="recommend: within --max-epoch-hours.")


class Flops(Out):
    forward: int
    backward: int
    recompute: int
    per_micro_batch: int
    per_optimizer_step: int
    forward_by_module: ByTerm


class StaticMemory(Out):
    """Weights, gradients and Adam's state, in fp32 and in mixed precision."""

    fp32: ByTerm
    mixed: ByTerm


class DeviceTarget(Out):
    """The device a plan is for, and what 16-bit arithmetic it runs natively
    (`ehrplan.plan.target`)."""

    device: str
    label: str
    native_mixed_precision: str | None = Field(description="bf16, fp16, or null (none).")
    evidence: str = Field(description="Why: compute capability, CPU flag, catalog row.")


class EstimateOut(Doc):
    """`ehrplan estimate --json`: parameters, peak training-step memory and FLOPs of one config."""

    command: Literal["estimate"]
    preset: str | None
    source: str = Field(description="Where the config came from (preset, file, overrides).")
    model_type: ModelType
    params: int
    params_by_component: ByTerm
    params_by_module: ByTerm
    precision: str
    device: str
    precision_reason: str = Field(description="Why this precision on this device.")
    target: DeviceTarget
    batch_size: int
    effective_batch_size: int
    checkpointing: bool
    memory: ByTerm = Field(description="The peak's bytes by what holds them.")
    total_bytes: int = Field(description="Estimated peak training-step memory.")
    peak_phase: str
    phases: ByTerm = Field(description="Live bytes at each moment of the step.")
    saved_for_backward_by_module: ByTerm
    device_overhead: ByTerm = Field(description="Assumed bytes beside the peak (CUDA context).")
    flops: Flops
    static_memory: StaticMemory
    notes: list[str]
    config: EHRModelConfig
    parallel: ParallelEstimate | None
    time: TimeEstimate | None
