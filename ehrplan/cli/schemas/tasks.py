"""Parts of documents about a label task and its examples (`ehrplan.data.tasks`,
`ehrplan.data.examples`, `ehrplan.data.shapes`), shared by data stats, train, predict, recommend
and validate."""

from __future__ import annotations

from pydantic import Field

from ehrplan.cli.schemas.base import Metric, Out


class Summary(Out):
    """mean, median, 95th percentile and maximum of a count."""

    mean: float
    p50: int
    p95: int
    max: int


class UnkShare(Out):
    """Events mapped to UNK, and distinct raw codes none of whose events has an id."""

    events: int
    events_fraction: float
    codes: int
    codes_fraction: float
    distinct_codes: int


class ExamplesLoss(Out):
    """What truncation drops from the examples' events before their prediction times."""

    examples: int
    events: int
    events_dropped: int
    events_dropped_fraction: float
    visits: int
    visits_dropped: int
    visits_cut: int = Field(description="Kept visits with more events than max_codes_per_visit.")


class TaskListing(Out):
    name: str
    kind: str = Field(description="binary, multiclass, regression or ckd_progression.")
    label_rows: int


class TaskSummary(Out):
    """The chosen task's examples (one per label row) and its label balance."""

    name: str
    kind: str
    files: list[str]
    label_rows: int
    examples: int
    examples_by_split: dict[str, int]
    labels_before_first_event: int = Field(description="Skipped: no event at or before.")
    labels_unknown_subject: int = Field(description="Skipped: a subject the data lacks.")
    balance: dict[str, float | int | dict[str, int]]


class ShapePercentiles(Out):
    examples: int
    sequences: int = Field(description="Forward passes after exact packing of examples.")
    visits_per_example: Summary = Field(description="Kept visits per train example.")
    codes_per_visit: Summary = Field(description="Kept codes per kept visit.")


class DataShaped(Out):
    """One config's estimate at the data's largest length-bucketed micro-batch."""

    shape: list[int] = Field(description="examples (sequences), visits, codes.")
    vocab_size: int = Field(description="The embedding table as training fits it to the data.")
    visit_groups: list[tuple[int, int]] | None
    estimate_bytes: int
    precision: str
    percentiles: ShapePercentiles
    fits: bool


class DataSource(Out):
    root: str
    task: str
    kind: str
    label_rows: int


class DataRecommendation(Out):
    preset: str
    estimate_bytes: int
    budget_bytes: int


class TaskInfo(Out):
    """The task a run trained on: its kind, model outputs and train-split baselines."""

    name: str
    kind: str
    outputs: int
    train_prevalence: float | None = None
    train_mean: float | None = None
    train_std: float | None = None
    majority_class: int | None = None


class LabelReport(Out):
    label_rows: int
    labels_unknown_subject: int
    labels_before_first_event: int
    examples: int


class TrainDataInfo(Out):
    """What the data gave a run and what was lost, per split."""

    examples: dict[str, int]
    labels: LabelReport
    truncation: dict[str, ExamplesLoss]
    unk: UnkShare
    splits_hashed: bool


class TaskMetrics(Out):
    """Metrics of one split: those of the task's kind are filled, each beside its baseline."""

    loss: Metric = None
    examples: int | None = None
    # binary
    auroc: Metric = None
    auprc: Metric = None
    brier: Metric = None
    positives: int | None = None
    prevalence: Metric = None
    baseline_auroc: Metric = None
    baseline_auprc: Metric = Field(None, description="The split's prevalence.")
    baseline_brier: Metric = Field(None, description="Predicting the train prevalence.")
    train_prevalence: Metric = None
    # regression
    mse: Metric = None
    mae: Metric = None
    baseline_mse: Metric = Field(None, description="Predicting the train mean.")
    baseline_mae: Metric = None
    train_mean: Metric = None
    # multiclass and the CKD composite
    stage_accuracy: Metric = None
    stage_macro_f1: Metric = None
    stage_macro_auroc: Metric = None
    stage_qw_kappa: Metric = None
    c_index: Metric = None
    mae_days_observed: Metric = None
    visits: int | None = None
    observed_events: int | None = None
    baseline_majority_stage: int | None = None
    baseline_stage_accuracy: Metric = None
    baseline_stage_macro_f1: Metric = None
