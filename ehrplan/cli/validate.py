"""`ehrplan validate`: for CI. Exit 0 if every config fits the budget, 1 if any does not, 2 if
the input is invalid. Never imports torch."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import RenderableType
from rich.table import Table

from ehrplan.cli.options import JsonOpt
from ehrplan.cli.output import emit
from ehrplan.cli.recommend import (
    DeviceOpt,
    GpusOpt,
    HeadroomOpt,
    StrategyOpt,
    TargetOpt,
    render_budget,
    resolve_budget,
)
from ehrplan.errors import DoesNotFitError, UsageError
from ehrplan.plan.config import EHRModelConfig, get_preset, resolve_config
from ehrplan.plan.planner import DEFAULT_HEADROOM, fit
from ehrplan.plan.units import fmt_bytes

ItemsArg = Annotated[
    list[str],
    typer.Argument(
        metavar="CONFIG_OR_PRESET...",
        help="Config TOML files and/or preset names (see `ehrplan presets`).",
        show_default=False,
    ),
]
BudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--budget",
        help="Usable memory per device: 16GB (10^9 B), 16GiB (2^30 B), 24g (= GiB).",
    ),
]


def load_item(item: str) -> tuple[str, EHRModelConfig]:
    """A config file (a path, or any name ending in .toml) or else a preset name."""
    if item.endswith(".toml") or Path(item).exists() or "/" in item:
        return item, resolve_config(config_file=item)[0]
    return item, get_preset(item).config


def validate(
    items: ItemsArg,
    budget: BudgetOpt = None,
    target: TargetOpt = None,
    headroom: HeadroomOpt = DEFAULT_HEADROOM,
    device: DeviceOpt = None,
    gpus: GpusOpt = None,
    strategy: StrategyOpt = "ddp",
    json_: JsonOpt = False,
) -> None:
    """Check that configs fit a memory budget (--budget SIZE or --target NAME): a CI gate.

    Exit 0: every config fits; 1: at least one does not (each is named with its estimate and the
    budget); 2: invalid input (unknown preset, malformed file, bad size).
    """
    if (budget is None) == (target is None):
        raise UsageError("give exactly one of --budget SIZE or --target NAME")
    b = resolve_budget(
        target, budget, gpus, headroom, device, memory_flag="--budget", strategy=strategy
    )
    configs = [load_item(i) for i in items]  # every input is checked before any verdict
    fits = [fit(cfg, b, name) for name, cfg in configs]
    notes = list(dict.fromkeys(n for f in fits for n in f.notes))
    payload = {
        "budget": b.as_dict(),
        "results": [f.as_dict() for f in fits],
        "ok": all(f.fits for f in fits),
        "estimate_notes": notes,
    }
    emit("validate", payload, as_json=json_, render=_render)
    failing = [f for f in fits if not f.fits]
    if failing:
        raise DoesNotFitError(
            "; ".join(
                f"{f.name} does not fit: estimated {fmt_bytes(f.estimate_bytes)} ({f.precision}) > "
                f"budget {fmt_bytes(f.budget_bytes)}, short by {fmt_bytes(f.shortfall_bytes)}"
                for f in failing
            )
        )


def _render(p: dict[str, Any]) -> Iterable[RenderableType]:
    yield from render_budget(p)
    table = Table(title="Estimated peak training-step memory")
    table.add_column("config", overflow="fold")
    for col in ("precision", "estimated peak", "budget", "verdict"):
        table.add_column(col, justify="right" if col in ("estimated peak", "budget") else "left")
    for r in p["results"]:
        verdict = (
            "[green]fits"
            if r["fits"]
            else f"[red]does not fit (short by {fmt_bytes(r['shortfall_bytes'])})"
        )
        table.add_row(
            r["name"],
            r["precision"],
            fmt_bytes(r["estimate_bytes"]),
            fmt_bytes(r["budget_bytes"]),
            verdict,
        )
    yield table
