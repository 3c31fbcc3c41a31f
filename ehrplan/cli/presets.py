"""`ehrplan presets`: the shipped presets with their exact parameter counts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ehrplan.cli.options import JsonOpt
from ehrplan.cli.output import emit
from ehrplan.plan.config import PRESET_ALIASES, load_presets

if TYPE_CHECKING:
    from rich.console import RenderableType

MarkdownOpt = Annotated[
    bool, typer.Option("--markdown", help="Print a Markdown table (as in the README).")
]


def presets(json_: JsonOpt = False, markdown: MarkdownOpt = False) -> None:
    """List the presets: model family, shape, batch and exact parameter count."""
    rows = []
    for name, p in load_presets().items():
        c = p.config
        rows.append(
            {
                "name": name,
                "aliases": [a for a, target in PRESET_ALIASES.items() if target == name],
                "model_type": c.model_type,
                "params": c.total_params,
                "batch_size": c.batch_size,
                "effective_batch_size": c.effective_batch_size,
                "max_visits": c.max_visits,
                "max_codes_per_visit": c.max_codes_per_visit,
                "target": p.meta.target,
                "description": p.meta.description,
                "file": str(p.path),
            }
        )
    emit(
        "presets",
        {"presets": rows},
        as_json=json_,
        render=_render_markdown if markdown else _render,
    )


COLUMNS = ("preset", "type", "params", "batch (effective)", "max visits x codes", "target")


def _cells(r: dict[str, Any]) -> list[str]:
    name = r["name"] + (f" ({', '.join(r['aliases'])})" if r["aliases"] else "")
    return [
        name,
        r["model_type"],
        f"{r['params']:,}",
        f"{r['batch_size']} ({r['effective_batch_size']})",
        f"{r['max_visits']} x {r['max_codes_per_visit']}",
        r["target"],
    ]


def _render_markdown(payload: dict[str, Any]) -> Iterable[RenderableType]:
    from rich.text import Text

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in payload["presets"]]
    yield Text("\n".join(lines))


def _render(payload: dict[str, Any]) -> Iterable[RenderableType]:
    from rich.table import Table

    table = Table(title="ehrplan presets (parameters: exact count of the built model)")
    for col in COLUMNS:
        table.add_column(col, justify="right" if col == "params" else "left")
    for r in payload["presets"]:
        table.add_row(*_cells(r))
    yield table
