"""The torch commands' documents: `dry-run`, `train`, `compare`, `export-embeddings`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ehrplan.cli.schemas.base import ByTerm, Doc, Metric, Out
from ehrplan.cli.schemas.estimate import CalibrationOut
from ehrplan.cli.schemas.tasks import TaskInfo, TaskMetrics, TrainDataInfo
from ehrplan.plan.config import EHRModelConfig, ModelType


class DryRunOut(Doc):
    """`ehrplan dry-run --json`: a measured training step beside its estimate."""

    command: Literal["dry-run"]
    source: str
    data: str | None
    batch_shape: list[int] | None = Field(description="patients, visits, codes (--data).")
    visit_groups: list[tuple[int, int]] | None
    model_type: ModelType
    device: str
    precision: str
    precision_reason: str = Field(description="Why this precision on this device.")
    batch_size: int
    micro_batches: int
    checkpointing: bool
    measured_peak_bytes: int
    estimated_peak_bytes: int
    error: float = Field(description="(estimated - measured) / measured.")
    peak_reserved_bytes: int | None
    process_peak_rss_bytes: int | None
    measured_allocator_peak_bytes: int | None = Field(
        description="Level 2 (CPU: profiler memory events; CUDA: max_memory_allocated)."
    )
    measured_process_peak_bytes: int | None = Field(
        description="Level 3 (CPU: peak RSS growth; CUDA: max_memory_reserved + context)."
    )
    estimated_allocator_peak_bytes: int
    estimated_process_peak_bytes: int
    allocator_setting: str
    calibration: CalibrationOut | None
    measurement_method: str
    lstm_kernel: str | None
    step_seconds: float
    estimated_peak_phase: str
    estimate_breakdown: ByTerm
    device_overhead: ByTerm
    available_bytes: int | None = Field(description="CPU: RAM available now (cgroup-aware).")
    total_bytes: int | None = Field(description="CPU: RAM, or the cgroup limit.")
    budget_bytes: int | None = Field(description="CPU: available less the headroom.")
    headroom: float | None
    notes: list[str]


SplitMetrics = TaskMetrics


class TuningAndHeldOut(Out):
    tuning: SplitMetrics
    held_out: SplitMetrics


class MemoryRecord(Out):
    """A measured step peak beside the estimate for the same data-shaped batch."""

    session: int
    step: int
    method: str
    batch_shape: list[int]
    visit_groups: list[tuple[int, int]] | None
    micro_batches: int | None
    measured_peak_bytes: int
    peak_reserved_bytes: int | None
    estimated_peak_bytes: int
    error: float | None


class Distributed(Out):
    strategy: str
    world_size: int
    micro_batch_per_rank: int
    accumulation_per_rank: int


class EmbeddingsInfo(Out):
    file: str
    format: str
    codes_in_file: int
    dim: int
    code_embed_dim: int
    projected: bool
    frozen: bool
    matched: int
    missing: int
    unused: int


class TrainOut(Doc):
    """`ehrplan train --json`: the run's summary (also its summary.json)."""

    command: Literal["train"]
    run_dir: str
    steps: int
    epochs_completed: int
    device: str
    precision: str
    patients_trained: int
    train_seconds: float
    patients_per_s: float | None
    workers: int = Field(
        0, description="DataLoader worker processes that collated ahead (0: in the process)."
    )
    wall_seconds_this_session: float
    final_train_loss: Metric
    peak_memory_bytes: int | None = Field(description="Largest process memory of any step.")
    memory: MemoryRecord | None = Field(description="The measurement with the largest |error|.")
    memory_measurements: int
    estimate_bytes: int
    best_step: int | None
    last: TuningAndHeldOut = Field(description="Metrics of the last weights.")
    best: TuningAndHeldOut = Field(description="Metrics of the best checkpoint (tuning loss).")
    distributed: Distributed | None = None
    source: str
    embeddings: EmbeddingsInfo | None = None
    reasons: list[str]
    config: EHRModelConfig
    task: TaskInfo | None = None
    data: TrainDataInfo | None = None


class PredictOut(Doc):
    command: Literal["predict"]
    run: str
    data: str
    task: str
    kind: str
    split: str
    rows: int = Field(description="Rows written: one per label row of the split.")
    label_rows_in_split: int
    device: str
    metrics: TaskMetrics
    out: str
    columns: list[str]


class HeldOutBrief(Out):
    loss: Metric
    stage_accuracy: Metric
    stage_macro_f1: Metric
    baseline_stage_macro_f1: Metric
    stage_macro_auroc: Metric
    c_index: Metric


class CompareSide(Out):
    """One model's run in a comparison."""

    preset: str
    run_dir: str
    parameters: int
    trainable_parameters: int
    vocab_size: int
    batch: list[int]
    patients_per_step: int
    estimated_peak_bytes: int | None
    measured_peak_bytes: int | None
    measured_step: int | None
    measured_batch: list[int] | None
    measured_method: str | None
    estimate_for_measured_batch_bytes: int | None
    estimate_error: float | None
    memory_measurements: int | None
    steps: int
    patients_trained: int
    patients_per_s: float | None
    train_seconds: float
    wall_seconds: float
    best_step: int | None
    final_train_loss: Metric
    held_out: HeldOutBrief


class CompareFiles(Out):
    json_: str = Field(alias="json")
    markdown: str
    png: str


class CompareOut(Doc):
    """`ehrplan compare --json`: the LSTM and the Transformer of one size, trained alike."""

    command: Literal["compare"]
    size: str
    data: str
    max_steps: int
    seed: int
    eval_every: int
    threads: int
    device: str
    comparison_dir: str
    files: CompareFiles
    held_out_metrics_of: str
    models: dict[ModelType, CompareSide]


class ExportEmbeddingsOut(Doc):
    """`ehrplan export-embeddings --json`: the file written."""

    command: Literal["export-embeddings"]
    run_dir: str
    checkpoint: str
    step: int
    out: str
    format: str
    codes: int
    dim: int
    bytes: int
