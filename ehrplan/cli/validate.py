"""`ehrplan validate`: for CI. Exit 0 if every config fits the budget, 1 if any does not, 2 if
the input is invalid. Never imports torch.

``--format text|json`` stop at the first invalid input; ``--format github|junit`` report every
config (an invalid one among them), then exit with the worst code.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from ehrplan.cli.options import (
    BatchSizeOpt,
    CalibrationOpt,
    JsonOpt,
    LabelsOpt,
    SetOpt,
    SplitsOpt,
    TaskOpt,
    batch_size_overrides,
    with_calibration,
)
from ehrplan.cli.output import emit, write_text
from ehrplan.cli.recommend import (
    DataDirOpt,
    DeviceOpt,
    GpusOpt,
    HeadroomOpt,
    PrecisionOpt,
    StrategyOpt,
    TargetOpt,
    render_budget,
    render_data_shapes,
    resolve_budget,
    with_data,
)
from ehrplan.errors import ConfigError, DoesNotFitError, EhrplanError, UsageError
from ehrplan.plan.config import (
    EHRModelConfig,
    config_file_path,
    get_preset,
    parse_override,
    resolve_config,
)
from ehrplan.plan.planner import DEFAULT_HEADROOM, Budget, fit
from ehrplan.plan.units import fmt_bytes

if TYPE_CHECKING:
    from rich.console import RenderableType

    from ehrplan.cli.ci_report import Verdict

ItemsArg = Annotated[
    list[str],
    typer.Argument(
        metavar="CONFIG_OR_PRESET...",
        help="Config files (TOML, or JSON such as a run folder's config.json), run folders, "
        "and/or preset names (see `ehrplan presets`).",
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

Format = Literal["text", "json", "github", "junit"]
FormatOpt = Annotated[
    Format | None,
    typer.Option(
        "--format",
        "-f",
        help="text (default), json (= --json), github (workflow annotations on each config "
        "file) or junit (JUnit XML, one test case per config).",
        show_default=False,
    ),
]


def is_file_item(item: str) -> bool:
    """A config file or run folder (a path, or a name ending in .toml/.json), not a preset."""
    return item.endswith((".toml", ".json")) or Path(item).exists() or "/" in item


CheckpointOpt = Annotated[
    bool | None,
    typer.Option(
        "--checkpointing/--no-checkpointing",
        help="Gradient checkpointing for every config (default: each config's use_checkpoint).",
    ),
]


def load_item(item: str, overrides: dict[str, Any] | None = None) -> tuple[str, EHRModelConfig]:
    """A config file (TOML or JSON), a run folder (its config.json), or else a preset name,
    with ``overrides`` (--set, --batch-size, --checkpointing) on top."""
    base = resolve_config(config_file=item)[0] if is_file_item(item) else get_preset(item).config
    if not overrides:
        return item, base
    return item, EHRModelConfig.model_validate({**base.model_dump(), **overrides})


def load_with_flags(
    item: str, fields: dict[str, Any], batch_size: int | None
) -> tuple[str, EHRModelConfig, str | None]:
    """``item`` with the command's field flags and ``--batch-size`` (which keeps the effective
    batch where it divides it), and what --batch-size did to it."""
    name, cfg = load_item(item)
    over = dict(fields)
    note = None
    if batch_size is not None:
        more, note = batch_size_overrides(cfg, batch_size, over)
        over.update(more)
    return (*load_item(item, over), note) if over else (name, cfg, note)


def validate(
    items: ItemsArg,
    budget: BudgetOpt = None,
    target: TargetOpt = None,
    headroom: HeadroomOpt = DEFAULT_HEADROOM,
    device: DeviceOpt = None,
    gpus: GpusOpt = None,
    strategy: StrategyOpt = "ddp",
    format_: FormatOpt = None,
    precision: PrecisionOpt = "auto",
    set_: SetOpt = None,
    batch_size: BatchSizeOpt = None,
    checkpointing: CheckpointOpt = None,
    data: DataDirOpt = None,
    task: TaskOpt = None,
    labels: LabelsOpt = None,
    splits: SplitsOpt = None,
    calibration: CalibrationOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Check that configs fit a memory budget (--budget SIZE or --target NAME): a CI gate.

    Exit 0: every config fits; 1: at least one does not (each is named with its estimate and the
    budget); 2: invalid input (unknown preset, malformed file, bad size). With --data, a config
    fits when its step at the data's largest micro-batch fits (the preset-maxima figure is shown
    beside it).
    """
    if json_ and format_ not in (None, "json"):
        raise UsageError(f"--json and --format {format_} disagree: give one of them")
    fmt: Format = "json" if json_ else (format_ or "text")
    if budget is not None and target is not None:
        raise UsageError("give one of --budget SIZE or --target NAME, not both")
    if budget is None and target is None and device is None:
        raise UsageError("give --budget SIZE, --target NAME, or --device for this machine")
    b = resolve_budget(
        target,
        budget,
        gpus,
        headroom,
        device,
        memory_flag="--budget",
        strategy=strategy,
        precision=precision,
    )
    if data is not None:
        from ehrplan.data.tasks import DataRequest

        b = with_data(b, data, DataRequest(task=task, labels=labels, splits=splits))
    b = with_calibration(b, calibration)
    fields: dict[str, Any] = dict(parse_override(i) for i in set_ or [])
    if checkpointing is not None:
        fields["use_checkpoint"] = checkpointing
    if fmt in ("github", "junit"):
        if data is not None:
            raise UsageError(f"--data answers in text or json, not --format {fmt}")
        _report(items, b, fmt, fields, batch_size)
        return
    configs = []  # every input is checked before any verdict
    batch_notes: list[str] = []
    for item in items:
        name, cfg, note = load_with_flags(item, fields, batch_size)
        configs.append((name, cfg))
        if note:
            batch_notes.append(f"{name}: {note}")
    fits = [fit(cfg, b, name) for name, cfg in configs]
    notes = list(dict.fromkeys(n for f in fits for n in f.notes))
    payload: dict[str, Any] = {
        "budget": b.as_dict(),
        "results": [f.as_dict() for f in fits],
        "ok": all(f.fits for f in fits),
        "batch_size_notes": batch_notes,
        "estimate_notes": notes,
    }
    verdicts = [(f.name, f.fits, f.estimate_bytes, f.precision, f.budget_bytes) for f in fits]
    if data is not None:
        from ehrplan.cli.output import say
        from ehrplan.data.shapes import data_shaped, data_summary, load_task_data
        from ehrplan.data.tasks import DataRequest

        td = load_task_data(data, DataRequest(task=task, labels=labels, splits=splits), say)
        payload["data"] = data_summary(td, data)
        verdicts = []
        for r, (_, cfg) in zip(payload["results"], configs, strict=True):
            ds = data_shaped(td, cfg, r["precision"], b.device)
            ds["fits"] = ds["estimate_bytes"] <= r["budget_bytes"]
            r["data_shaped"] = ds
            verdicts.append(
                (r["name"], ds["fits"], ds["estimate_bytes"], r["precision"], r["budget_bytes"])
            )
        payload["ok"] = all(v[1] for v in verdicts)
    emit("validate", payload, as_json=fmt == "json", render=_render)
    failing = [v for v in verdicts if not v[1]]
    if failing:
        at = " at the data's largest batch" if data is not None else ""
        raise DoesNotFitError(
            "; ".join(
                f"{name} does not fit: estimated {fmt_bytes(est)} ({prec}){at} > "
                f"budget {fmt_bytes(bud)}, short by {fmt_bytes(est - bud)}"
                for name, _, est, prec, bud in failing
            )
        )


def _verdict(item: str, budget: Budget, fields: dict[str, Any], batch_size: int | None) -> Verdict:
    """One config judged; an invalid one is a verdict too (its one-line error)."""
    from ehrplan.cli.ci_report import Verdict

    file = str(config_file_path(item)) if is_file_item(item) else None
    start = time.perf_counter()
    try:
        name, cfg, _ = load_with_flags(item, fields, batch_size)
        f = fit(cfg, budget, name)
    except EhrplanError as e:
        return Verdict(item, file, None, str(e), time.perf_counter() - start)
    return Verdict(item, file, f, None, time.perf_counter() - start)


def _report(
    items: list[str],
    budget: Budget,
    fmt: Format,
    fields: dict[str, Any],
    batch_size: int | None,
) -> None:
    """Every config's verdict as GitHub annotations or JUnit XML; exit 2 if any is invalid,
    else 1 if any does not fit."""
    from ehrplan.cli.ci_report import github_annotations, junit_xml

    verdicts = [_verdict(i, budget, fields, batch_size) for i in items]
    render = github_annotations if fmt == "github" else junit_xml
    write_text(render(verdicts, budget))
    invalid = [v for v in verdicts if v.status == "invalid"]
    if invalid:
        raise ConfigError(
            f"{len(invalid)} of {len(verdicts)} config(s) invalid: {invalid[0].message}"
        )
    failing = [v for v in verdicts if v.status == "does not fit"]
    if failing:
        raise DoesNotFitError("; ".join(v.message for v in failing))


def _render(p: dict[str, Any]) -> Iterable[RenderableType]:
    from rich.table import Table
    from rich.text import Text

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
    for r in p["results"]:
        yield Text(f"{r['name']}: {r['precision']} on {r['device']}: {r['precision_reason']}")
    for n in p["batch_size_notes"]:
        yield Text(n)
    if p.get("data"):
        yield from render_data_shapes(p)
