"""Options shared by several commands, written once with ``Annotated``, and the one parser of
numbers every float option uses.

Numbers are checked where they are parsed: ``nan``, ``inf`` and values too large for a float are
refused by `finite` for every float option, and integer options carry their ranges (`SEED_MAX`,
`COUNT_MAX`), so a bad number is a usage error (exit 2) and exit 3 always means that training
diverged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from ehrplan.plan.config import EHRModelConfig, parse_override, resolve_config

PresetOpt = Annotated[
    str | None,
    typer.Option("--preset", "-p", help="Preset name (see `ehrplan presets`), e.g. small-lstm."),
]
SizeOpt = Annotated[
    str | None,
    typer.Option("--size", help="Preset size: tiny, small, medium or large (with --type)."),
]
TypeOpt = Annotated[
    str | None,
    typer.Option("--type", "-t", help="Model family: lstm or transformer (with --size)."),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="A TOML or JSON file of config fields (or a run folder / its config.json); it "
        "overrides the preset, flags override it.",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override one config field, KEY=VALUE (repeatable), e.g. --set hidden_dim=384.",
    ),
]
SEED_MAX = 2**32 - 1
"""Largest seed (the range numpy's and torch's seeders share)."""
COUNT_MAX = 2**31 - 1
"""Largest count an integer option takes (patients, steps, batch): beyond any machine."""
MAX_THREADS = 4096
"""Largest --threads / --nproc."""
MAX_WINDOW_HOURS = 24 * 365 * 100
"""Largest visit window, in hours (a century)."""
MAX_VALUE_BINS = 1000
"""Most quantile bins of a numeric value."""


def finite(
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> Callable[[Any], float]:
    """A Typer ``parser`` for a float option: a finite number within the bounds given, else a
    one-line usage error naming the option."""
    bounds = [
        (gt, "more than", lambda x, b: x > b),
        (ge, "at least", lambda x, b: x >= b),
        (lt, "less than", lambda x, b: x < b),
        (le, "at most", lambda x, b: x <= b),
    ]

    def parse(value: Any) -> float:
        if isinstance(value, float | int) and not isinstance(value, bool):
            x = float(value)
        else:
            try:
                x = float(str(value).strip())
            except (ValueError, OverflowError):
                raise typer.BadParameter(f"'{value}' is not a number") from None
        if not math.isfinite(x):
            raise typer.BadParameter(f"must be a finite number, not '{value}'")
        for bound, words, ok in bounds:
            if bound is not None and not ok(x, bound):
                raise typer.BadParameter(f"must be {words} {bound:g}, not {value}")
        return x

    return parse


BatchSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        "-b",
        min=1,
        max=COUNT_MAX,
        help="The micro-batch size. Where it divides the effective batch, the accumulation "
        "steps change to keep it (unless --set gradient_accumulation_steps=N is given); "
        "otherwise the effective batch changes, and the output says so.",
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON document (stable, versioned schema).")
]


def batch_size_overrides(
    base: EHRModelConfig, batch_size: int, overrides: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """``--batch-size N`` as config fields: the accumulation that keeps ``base``'s effective
    batch where N divides it (and no accumulation was set), and a note saying what happened to
    the effective batch (the commands print it with the config's source)."""
    eff = base.effective_batch_size
    acc = overrides.get("gradient_accumulation_steps")
    if acc is None and eff % batch_size == 0:
        acc = eff // batch_size
        note = f"--batch-size {batch_size} x {acc} accumulation keeps the effective batch {eff}"
        return {"batch_size": batch_size, "gradient_accumulation_steps": acc}, note
    new = batch_size * int(acc if acc is not None else base.gradient_accumulation_steps)
    if new != eff:
        return {"batch_size": batch_size}, f"the effective batch changes from {eff} to {new}"
    return {"batch_size": batch_size}, f"the effective batch {eff} is kept"


def config_from_options(
    preset: str | None,
    size: str | None,
    model_type: str | None,
    config: Path | None,
    set_: list[str] | None,
    batch_size: int | None = None,
    **flags: Any,
) -> tuple[EHRModelConfig, str]:
    """Resolve the config a command was pointed at; named flags win over ``--set`` items;
    ``--batch-size`` keeps the effective batch where it can (`batch_size_overrides`)."""
    overrides: dict[str, Any] = dict(parse_override(item) for item in set_ or [])
    overrides.update({k: v for k, v in flags.items() if v is not None})
    note = ""
    if batch_size is not None:
        base, _ = resolve_config(
            preset=preset,
            size=size,
            model_type=model_type,
            config_file=config,
            overrides=overrides,
        )
        fields, note = batch_size_overrides(base, batch_size, overrides)
        overrides.update(fields)
    cfg, source = resolve_config(
        preset=preset,
        size=size,
        model_type=model_type,
        config_file=config,
        overrides=overrides,
    )
    return cfg, source + (f" ({note})" if note else "")


def training_environ() -> None:
    """Runtime settings for training, set before torch (and its OpenMP and oneDNN runtimes) is
    imported; a value the user set stands.

    - ``OMP_WAIT_POLICY=PASSIVE``: spinning OpenMP threads on cores other processes hold stall
      every small kernel.
    - ``ONEDNN_PRIMITIVE_CACHE_CAPACITY=64``: the within-visit length groups give the LSTM many
      shapes and oneDNN keeps a primitive per shape (1,024 by default); a 200-step small-lstm
      run peaked at 1.46 GiB RSS with the default and about 1.1 GiB with 64, at the same speed.
    """
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")


CalibrationOpt = Annotated[
    Path | None,
    typer.Option(
        "--calibration",
        help="A calibration profile (JSON from `ehrplan calibrate`) to use instead of the one "
        "cached for the device; e.g. a GPU's profile kept in the repository for CI.",
    ),
]


def with_calibration(budget: Any, calibration: Path | None) -> Any:
    """``budget`` (`ehrplan.plan.planner.Budget`) planning with an explicit profile; the file is
    checked now (one line naming it, exit 2, when it is not a profile for the budget's device)."""
    if calibration is None:
        return budget
    from dataclasses import replace

    from ehrplan.plan.calibration import load_profile

    load_profile(calibration, budget.device)
    return replace(budget, calibration=str(calibration))


TaskOpt = Annotated[
    str | None,
    typer.Option(
        "--task",
        help="Label task: reads DIR/tasks/NAME/**/*.parquet (default: the data set's only task).",
    ),
]
LabelsOpt = Annotated[
    Path | None,
    typer.Option(
        "--labels",
        help="A label file or task folder anywhere (MEDS LabelSchema), instead of --task.",
    ),
]
SplitsOpt = Annotated[
    str | None,
    typer.Option(
        "--splits",
        help="Split names of the data's subject_splits.parquet, e.g. "
        "train=train,tuning=val,held_out=test (default: train, tuning, held_out).",
    ),
]
MinCodeCountOpt = Annotated[
    int | None,
    typer.Option(
        "--min-code-count",
        min=1,
        help="Vocabulary cut-off: train-split occurrences a code needs to get its own id "
        "(default 5; rarer codes map to UNK).",
    ),
]
