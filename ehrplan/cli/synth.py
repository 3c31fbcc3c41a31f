"""`ehrplan synth`: write a seeded synthetic CKD cohort as a MEDS data set (no torch)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import RenderableType
from rich.table import Table

from ehrplan.cli.options import COUNT_MAX, SEED_MAX, JsonOpt
from ehrplan.cli.output import emit


def synth(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Directory to create (must not exist or be empty).")
    ],
    patients: Annotated[
        int,
        typer.Option(
            "--patients",
            "-n",
            min=1,
            max=2**62,  # subject ids are int64; the disk-space check refuses far fewer
            help="Number of patients to generate.",
        ),
    ] = 2000,
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            min=0,
            max=SEED_MAX,
            help="Random seed (0 to 2^32-1): same seed and shard size, same bytes.",
        ),
    ] = 0,
    shard_size: Annotated[
        int,
        typer.Option(
            "--shard-size",
            min=1,
            max=COUNT_MAX,
            help="Patients per data file (data/<split>/<k>.parquet); written as they fill.",
        ),
    ] = 10_000,
    json_: JsonOpt = False,
) -> None:
    """Generate a synthetic chronic-kidney-disease cohort and write it as MEDS.

    Streams the patients in blocks of 1,000, so memory stays bounded at any --patients, and
    refuses up front an output larger than the free disk space. Writes
    data/<split>/<k>.parquet, metadata/{codes,subject_splits}.parquet, metadata/dataset.json and
    the label task tasks/ckd_stage/ (stage per visit, days to the next stage change, and whether
    it was seen). See `ehrplan.data.synth` for the modelling choices.
    """
    from ehrplan.data.synth_write import write_cohort

    start = time.perf_counter()
    summary = write_cohort(out, patients, seed, shard_size)
    payload = asdict(summary) | {"seed": seed, "seconds": round(time.perf_counter() - start, 3)}
    emit("synth", payload, as_json=json_, render=_render)


def _render(p: dict[str, Any]) -> Iterable[RenderableType]:
    t = Table(title=f"MEDS cohort written to {p['out']} (seed {p['seed']}, {p['seconds']} s)")
    t.add_column("")
    t.add_column("count", justify="right")
    for key in ("patients", "events", "clinical_visits", "label_rows", "codes"):
        t.add_row(key.replace("_", " "), f"{p[key]:,}")
    for split, n in p["patients_by_split"].items():
        t.add_row(f"patients in {split}", f"{n:,}")
    yield t
