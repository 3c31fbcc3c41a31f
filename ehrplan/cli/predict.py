"""`ehrplan predict`: a trained run's predictions for a task's label rows, as a MEDS file."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import RenderableType

from ehrplan.cli.options import JsonOpt, LabelsOpt, TaskOpt, training_environ
from ehrplan.cli.output import emit
from ehrplan.errors import UsageError

RunArg = Annotated[
    Path, typer.Argument(help="A run folder of `ehrplan train` (config.json, checkpoints/).")
]
DataOpt = Annotated[Path, typer.Option("--data", help="Root of the MEDS data set to predict on.")]
SplitOpt = Annotated[
    str, typer.Option("--split", help="train, tuning or held_out (default held_out).")
]
OutOpt = Annotated[
    Path, typer.Option("--out", "-o", help="Parquet file to write (MEDS prediction columns).")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")]


def predict(
    run: RunArg,
    data: DataOpt,
    out: OutOpt,
    task: TaskOpt = None,
    labels: LabelsOpt = None,
    split: SplitOpt = "held_out",
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """Predict every label row of one split with a run's best checkpoint.

    Writes one row per label row: subject_id, prediction_time, the true value column and the
    predicted columns of the task's kind (binary: predicted_boolean_value and
    predicted_boolean_probability). The task defaults to the one the run was trained on.
    """
    if out.suffix.lower() != ".parquet":
        raise UsageError(f"--out {out}: expected a .parquet file")
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out}: is a directory")
    training_environ()
    from ehrplan.data.meds import write_parquet
    from ehrplan.runtime.predict import predict_table

    table, info = predict_table(run, data, task=task, labels=labels, split=split, device=device)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_parquet(table, out)
    info["out"] = str(out)
    info["columns"] = table.column_names
    emit("predict", info, as_json=json_, render=_render)


def _render(p: dict[str, Any]) -> Iterable[RenderableType]:
    m = p["metrics"]
    shown = {
        "binary": ("auroc", "auprc", "brier"),
        "regression": ("mse", "mae"),
    }.get(p["kind"], ("stage_accuracy", "stage_macro_f1"))
    figures = ", ".join(
        f"{k} {m[k]:.3f}"
        + (f" (baseline {m['baseline_' + k]:.3f})" if m.get("baseline_" + k) else "")
        for k in shown
        if m.get(k) is not None
    )
    yield (
        f"wrote {p['rows']:,} predictions ({p['split']} split of task {p['task']}, {p['kind']}) "
        f"to {p['out']}: {figures}"
    )
