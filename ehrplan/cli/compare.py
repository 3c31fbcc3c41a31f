"""`ehrplan compare`: LSTM vs Transformer of one size, same data, steps and seed, side by side."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import RenderableType
from rich.table import Table

from ehrplan.cli.options import (
    COUNT_MAX,
    MAX_THREADS,
    SEED_MAX,
    JsonOpt,
    LabelsOpt,
    SplitsOpt,
    TaskOpt,
    training_environ,
)
from ehrplan.cli.output import emit

SizeOpt = Annotated[
    str, typer.Option("--size", help="Preset size to compare: tiny, small, medium or large.")
]
DataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="A MEDS data set with labels (tasks/ckd_stage). Default: the cached synthetic CKD "
        "cohort that `ehrplan train` uses.",
    ),
]
PatientsOpt = Annotated[
    int,
    typer.Option(
        "--patients", help="Patients in the default synthetic cohort.", min=50, max=COUNT_MAX
    ),
]
MaxStepsOpt = Annotated[
    int,
    typer.Option(
        "--max-steps", help="Optimizer steps for each model (the same).", min=1, max=COUNT_MAX
    ),
]
SeedOpt = Annotated[
    int,
    typer.Option(
        "--seed", min=0, max=SEED_MAX, help="Seed of weights, data order, dropout (0 to 2^32-1)."
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out", "-o", help="Comparison folder (default runs/compare-<size>, numbered if taken)."
    ),
]
EvalEveryOpt = Annotated[
    int | None,
    typer.Option(
        "--eval-every",
        help="Evaluate on the tuning split every N steps (default: max-steps / 10), the points "
        "of the tuning curves.",
        min=1,
        max=COUNT_MAX,
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="CPU threads for both runs (default: the idle cores, chosen once for both).",
        min=1,
        max=MAX_THREADS,
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")]


def compare(
    size: SizeOpt = "tiny",
    data: DataOpt = None,
    task: TaskOpt = None,
    labels: LabelsOpt = None,
    splits: SplitsOpt = None,
    patients: PatientsOpt = 2000,
    max_steps: MaxStepsOpt = 200,
    seed: SeedOpt = 0,
    out: OutOpt = None,
    eval_every: EvalEveryOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """Train the LSTM and the Transformer of one size alike and put them side by side.

    Same data split, step budget, seed and threads for both. Prints parameters, estimated and
    measured peak memory, patients/s, wall time and held-out stage macro-F1, AUROC and C-index;
    writes comparison.json, comparison.md and curves.png (both learning curves) into the
    comparison folder.
    """
    training_environ()  # before torch is imported
    from ehrplan.runtime.compare import CompareRequest, run_compare

    payload = run_compare(
        CompareRequest(
            size=size,
            data=data,
            patients=patients,
            max_steps=max_steps,
            seed=seed,
            out=out,
            eval_every=eval_every,
            threads=threads,
            device=device,
            json=json_,
            task=task,
            labels=labels,
            splits=splits,
        )
    )
    emit("compare", payload, as_json=json_, render=_render)


def _render(p: dict[str, Any]) -> Iterable[RenderableType]:
    from ehrplan.runtime.compare import HEADER, notes, table_rows, title

    t = Table(title=title(p), caption=f"held-out: {p['held_out_metrics_of']}")
    t.add_column(HEADER[0])
    for h in HEADER[1:]:
        t.add_column(h, justify="right")
    for row in table_rows(p):
        t.add_row(*row)
    yield t
    yield from notes(p)
    for name, path in p["files"].items():
        yield f"{name}: {path}"
