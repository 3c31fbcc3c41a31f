"""Options shared by several commands, written once with ``Annotated``."""

from __future__ import annotations

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
BatchSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        "-b",
        min=1,
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
