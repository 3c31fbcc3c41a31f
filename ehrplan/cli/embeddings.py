"""`ehrplan export-embeddings`: a trained run's code embeddings, in a file another run can load."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import RenderableType

from ehrplan.cli.options import JsonOpt
from ehrplan.cli.output import emit

RunDirArg = Annotated[
    Path, typer.Argument(help="A run folder of `ehrplan train` (checkpoints/, vocab.json).")
]
OutOpt = Annotated[
    Path,
    typer.Option(
        "--out",
        "-o",
        help="File to write; its suffix names the format: .safetensors, .pt/.pth, or .txt/.vec "
        "(word2vec text).",
    ),
]
CheckpointOpt = Annotated[
    str,
    typer.Option("--checkpoint", help="best (lowest tuning loss, the default) or last (newest)."),
]


def export_embeddings(
    run_dir: RunDirArg, out: OutOpt, checkpoint: CheckpointOpt = "best", json_: JsonOpt = False
) -> None:
    """Write a trained run's code embeddings to a file `train --embeddings` reads.

    One vector per vocabulary code (PAD and UNK are not codes and are left out), from the best
    or last checkpoint, so one run can seed another.
    """
    from ehrplan.runtime.embeddings import _suffix, run_embeddings, save_embeddings

    _suffix(out)  # an unknown format is refused before the checkpoint is read
    emb, step = run_embeddings(run_dir, checkpoint)
    path = save_embeddings(emb, out)
    payload = {
        "run_dir": str(run_dir),
        "checkpoint": checkpoint,
        "step": step,
        "out": str(path),
        "format": path.suffix.lower().lstrip("."),
        "codes": len(emb.codes),
        "dim": emb.dim,
        "bytes": path.stat().st_size,
    }
    emit("export-embeddings", payload, as_json=json_, render=_render)


def _render(p: dict[str, Any]) -> Iterable[RenderableType]:
    yield (
        f"wrote {p['codes']:,} code embeddings of width {p['dim']} from {p['run_dir']} "
        f"({p['checkpoint']} checkpoint, step {p['step']}) to {p['out']} ({p['format']})"
    )
