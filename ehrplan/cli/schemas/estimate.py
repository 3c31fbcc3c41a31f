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


class MemoryLevelsOut(Out):
    """Levels 2 and 3 of the peak (`ehrplan.plan.levels`), each with the model it follows."""

    live_bytes: int
    kernel_scratch_bytes: int
    allocator_peak_bytes: int
    process_terms: ByTerm
    process_peak_bytes: int
    fit_bytes: int
    models: dict[str, str]


class CalibrationOut(Out):
    """The calibration profile an answer used (`ehrplan.plan.calibration`)."""

    device: str
    device_name: str
    date: str
    torch_version: str
    path: str
    terms: dict[str, int | float]


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
    allocator_peak_bytes: int = Field(description="Live peak + kernel scratch (level 2).")
    process_peak_bytes: int = Field(description="What the OS or driver counts (level 3).")
    fit_bytes: int = Field(
        description="What recommend and validate compare with a budget: the process level less "
        "the CUDA context allowance a GPU budget already deducts."
    )
    memory_levels: MemoryLevelsOut
    calibration: CalibrationOut | None = Field(description="null: uncalibrated (see notes).")
    flops: Flops
    static_memory: StaticMemory
    notes: list[str]
    config: EHRModelConfig
    parallel: ParallelEstimate | None
    time: TimeEstimate | None


class LadderShape(Out):
    """One measured shape of the calibration ladder (`ehrplan.runtime.calibrate`)."""

    name: str
    model_type: str
    batch: int
    visits: int
    codes: int
    live_bytes: int
    allocator_peak_bytes: int
    process_peak_bytes: int
    reserved_bytes: int | None
    estimated_bytes: int
    lstm_gate_bytes: int
    step_seconds: float = Field(description="Wall time of one training step on the device.")
    flops_per_step: int = Field(description="Analytic FLOPs of that step (throughput basis).")


class CalibrateOut(Doc):
    command: Literal["calibrate"]
    path: str = Field(description="Where the profile was written.")
    seconds: float
    label: str
    format: str
    format_version: int
    device: str
    device_name: str
    driver: str
    torch_version: str
    date: str
    host: str
    terms: dict[str, int | float]
    fitted: list[str]
    residuals: dict[str, dict[str, float]]
    ladder: list[LadderShape]
    skipped: list[dict[str, str]]
