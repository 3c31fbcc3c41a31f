"""`ehrplan presets`: the shipped presets with their exact parameter counts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import RenderableType
from rich.table import Table

from ehrplan.cli.options import JsonOpt
from ehrplan.config import PRESET_ALIASES, load_presets
from ehrplan.output import emit, fmt_count


def presets(json_: JsonOpt = False) -> None:
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
    emit("presets", {"presets": rows}, as_json=json_, render=_render)


def _render(payload: dict[str, Any]) -> Iterable[RenderableType]:
    table = Table(title="ehrplan presets")
    for col in ("preset", "type", "params", "batch (effective)", "max visits x codes", "target"):
        table.add_column(col, justify="right" if col == "params" else "left")
    for r in payload["presets"]:
        name = r["name"] + (f" ({', '.join(r['aliases'])})" if r["aliases"] else "")
        table.add_row(
            name,
            r["model_type"],
            fmt_count(r["params"]),
            f"{r['batch_size']} ({r['effective_batch_size']})",
            f"{r['max_visits']} x {r['max_codes_per_visit']}",
            r["target"],
        )
    yield table
