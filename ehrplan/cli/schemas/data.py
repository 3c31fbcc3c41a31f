"""`synth --json` and `data stats --json`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ehrplan.cli.schemas.base import Doc, Out
from ehrplan.cli.schemas.tasks import ExamplesLoss, TaskListing, TaskSummary, UnkShare


class Summary(Out):
    """mean, median, 95th percentile and maximum of a count."""

    mean: float
    p50: int
    p95: int
    max: int


class SynthOut(Doc):
    """`ehrplan synth --json`: what was written."""

    command: Literal["synth"]
    out: str
    patients: int
    events: int
    clinical_visits: int
    label_rows: int
    codes: int
    shard_size: int = Field(description="Patients per data file (the last of a split fewer).")
    files: list[str]
    patients_by_split: dict[str, int]
    seed: int
    seconds: float


class DataPrepareOut(Doc):
    command: Literal["data prepare"]
    root: str
    cache: str = Field(description="The cache folder (under $EHRPLAN_CACHE/examples/).")
    reused: bool = Field(description="True: a valid cache was opened; False: built now.")
    seconds: float
    patients: int
    visits: int
    events: int
    vocab_size: int
    token_dtype: Literal["int16", "int32"]
    bytes_on_disk: int = Field(description="All arrays of the cache, in bytes.")
    arrays: dict[str, int] = Field(description="Bytes per array file.")
    events_per_second: int | None = Field(
        default=None, description="Build speed; only when the cache was built now."
    )
    workers: int = Field(description="Build processes (--workers).")
    task: str | None = Field(description="The label task the examples come from (None: none).")
    kind: str | None = Field(description="The task's kind (binary, multiclass, ...).")
    examples: int = Field(description="Examples: one per label row with events before it.")
    label_rows: int = Field(description="The task's label rows.")


class TimeToEvent(Out):
    p50: float | None
    max: float | None


class LabelBalance(Out):
    labelled_visits: int
    stage_counts: dict[str, int]
    event_observed: int
    censored: int
    time_to_event_days: TimeToEvent


class VocabInfo(Out):
    min_count: int
    value_bins: int
    size: int


class Truncation(Out):
    max_visits: int
    max_codes_per_visit: int
    patients: int
    patients_truncated: int
    visits: int
    visits_dropped: int
    visits_truncated: int
    events: int
    events_dropped: int
    events_dropped_fraction: float


class BatchDims(Out):
    batch_size: int
    bucketing: bool
    batches: int
    visits: Summary
    codes_per_visit: Summary
    positions: Summary
    positions_at_preset_maxima: int
    real_codes: int
    padding_ratio: float | None
    padding_ratio_preset_maxima: float | None


class BatchShapes(Out):
    unit: Literal["sequences", "patients"] = Field(
        description="What a batch holds: the task's train-split sequences (examples packed as "
        "training packs them), or whole patients when the data has no task."
    )
    per_batch: BatchDims
    per_batch_bucketed: BatchDims


class DataMemory(Out):
    cache_pages: int = Field(description="The mapped example cache (an epoch touches all).")
    process_arrays: int = Field(description="Per-visit and per-patient arrays held in memory.")
    batches: int = Field(description="Batches alive at once at the largest shape.")
    worker_processes: int = Field(
        description="The DataLoader workers' own memory (`data stats --train-workers N`)."
    )
    total: int


class PresetStats(Out):
    preset: str
    vocab_size: int
    truncation: Truncation
    host_ram_for_data: DataMemory = Field(
        description="Host RAM (bytes) a training process needs for the data at this preset's "
        "batch and maxima, with --train-workers DataLoader workers (default none; "
        "`ehrplan.data.cache.data_memory`)."
    )
    batch_shapes: BatchShapes
    examples_truncation: ExamplesLoss | None = Field(
        None, description="Of the task's examples' events before prediction time."
    )


class DataStatsOut(Doc):
    """`ehrplan data stats --json`: the shape of a MEDS data set and what each preset would cut."""

    command: Literal["data stats"]
    root: str
    files: int
    patients: int
    events: int
    visits: int
    visit_window_hours: float
    visits_per_patient: Summary
    codes_per_visit: Summary
    distinct_codes: int
    vocab_size: int | None
    patients_by_split: dict[str, int]
    labels: LabelBalance | None
    reader: dict[str, int] = Field(description="What the reader read, dropped and replaced.")
    vocab: VocabInfo
    example_cache: str = Field(
        description="The example cache these figures were read from (built on first use, the "
        "one `ehrplan train` reads)."
    )
    example_cache_bytes: int = Field(
        description="Bytes on disk of this data set's example cache (`ehrplan data prepare`)."
    )
    unk: UnkShare
    tasks: list[TaskListing] = Field(description="Every task under tasks/.")
    task: TaskSummary | None = Field(description="The chosen (or only) task.")
    presets: list[PresetStats]
    warnings: list[str]
