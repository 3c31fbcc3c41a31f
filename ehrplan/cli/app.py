"""The `ehrplan` command: registers the command modules and maps errors to exit codes.

Every command is one entry of `COMMANDS`: the module under `ehrplan.cli` that holds it, and the
line `ehrplan --help` lists for it. A command's module is imported only when that command runs
(or its own `--help` is asked for), so `ehrplan estimate` pays for the estimate's imports alone
and `ehrplan --help` for none. A command needs the `train` extra (torch, numpy, pyarrow, ...)
unless its entry says ``planner=True``; run without the extra installed, it stops with one line
naming the extra (exit 2) before any of its work. A new command gets this by being registered.

Set ``EHRPLAN_DEBUG=1`` to get the full traceback of any error instead of one line.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from ehrplan.cli.extras import as_missing_extra, require_train_extra
from ehrplan.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EhrplanError

APP_HELP = (
    "Which EHR sequence model fits your machine: estimate it, prove it with a dry run, "
    "then train it."
)
_SETTINGS: dict[str, Any] = {
    "add_completion": False,
    "pretty_exceptions_enable": False,
    "rich_markup_mode": "rich",
}


@dataclass(frozen=True)
class Command:
    """Where a command lives, and what `ehrplan --help` says of it without importing it."""

    module: str
    """The module under `ehrplan.cli`."""
    attr: str
    """The command function in it, or a `typer.Typer` group of commands."""
    help: str
    """The line `ehrplan --help` lists: the first paragraph of the command's own help (tested)."""
    planner: bool = False
    """Runs on the base install (no torch, numpy or pyarrow); otherwise needs the `train` extra."""


COMMANDS: dict[str, Command] = {
    "presets": Command(
        "presets",
        "presets",
        "List the presets: model family, shape, batch and exact parameter count.",
        planner=True,
    ),
    "estimate": Command(
        "estimate",
        "estimate",
        "Exact parameter count by component, and the memory of one training step.",
        planner=True,
    ),
    "synth": Command(
        "synth",
        "synth",
        "Generate a synthetic chronic-kidney-disease cohort and write it as MEDS.",
    ),
    "dry-run": Command(
        "dryrun",
        "dry_run",
        "Build the model, run two real training steps, and report the measured peak memory of "
        "the second one beside the analytic estimate.",
    ),
    "hardware": Command(
        "hardware",
        "hardware",
        "What this machine has to train on, and how much of it a training step may use.",
        planner=True,
    ),
    "recommend": Command(
        "recommend",
        "recommend",
        "Which presets fit this machine (or --target / --memory), and what makes the next one fit.",
        planner=True,
    ),
    "validate": Command(
        "validate",
        "validate",
        "Check that configs fit a memory budget (--budget SIZE or --target NAME): a CI gate.",
        planner=True,
    ),
    "train": Command(
        "train",
        "train",
        "Train a model: --auto picks what fits this machine, or name it with "
        "--preset/--size/--type.",
    ),
    "compare": Command(
        "compare",
        "compare",
        "Train the LSTM and the Transformer of one size alike and put them side by side.",
    ),
    "export-embeddings": Command(
        "embeddings",
        "export_embeddings",
        "Write a trained run's code embeddings to a file `train --embeddings` reads.",
    ),
    "schema": Command(
        "schema",
        "schema",
        "Print the JSON Schema (draft 2020-12) of COMMAND's --json output.",
        planner=True,
    ),
    "data": Command(
        "data",
        "data_app",
        "Inspect MEDS data sets: size, shape, labels, and what a preset would truncate.",
    ),
}


def load_command(name: str) -> Any:
    """Import the module of command ``name`` and build its Click command (or group)."""
    spec = COMMANDS[name]
    label = f"ehrplan {name}"
    try:
        module = importlib.import_module(f"ehrplan.cli.{spec.module}")
    except ModuleNotFoundError as err:
        missing = as_missing_extra(err, label)
        if missing is None:
            raise
        raise missing from None
    obj = getattr(module, spec.attr)
    if isinstance(obj, typer.Typer):
        cmd = typer.main.get_group(obj)
    else:
        single = typer.Typer(**_SETTINGS)
        single.command(name)(obj)
        cmd = typer.main.get_command(single)
    cmd.name = name
    return cmd


class LazyGroup(TyperGroup):
    """The root group: lists `COMMANDS` from their help lines, imports one only to run it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._listing = False
        for name, spec in COMMANDS.items():  # stand-ins: names for errors, lines for --help
            self.commands[name] = TyperCommand(name=name, help=spec.help)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if self._listing or cmd_name not in COMMANDS:
            return super().get_command(ctx, cmd_name)
        return load_command(cmd_name)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        """Find the command; stop with one line if it needs the `train` extra and lacks it
        (before its options are parsed; its ``--help`` still works)."""
        name, cmd, rest = super().resolve_command(ctx, args)
        spec = COMMANDS.get(name or "")
        if spec is not None and not spec.planner and not set(rest) & set(ctx.help_option_names):
            sub = rest[:1] if rest and rest[0] in (getattr(cmd, "commands", None) or {}) else []
            require_train_extra(" ".join(["ehrplan", str(name), *sub]))
        return name, cmd, rest


app = typer.Typer(
    name="ehrplan",
    help=APP_HELP,
    cls=LazyGroup,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    **_SETTINGS,
)


def _print_version(value: bool) -> None:
    if value:
        from ehrplan import __version__

        print(f"ehrplan {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """The root of every command; its one option is --version (the help is `APP_HELP`)."""


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _command_label(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    words = [a for a in args if not a.startswith("-")][:1]
    return " ".join(["ehrplan", *words])


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, map every failure to one line and an exit code.

    Typer handles usage errors (exit 2) and ``--help``; ehrplan's own errors are raised as
    `EhrplanError` subclasses and mapped here, in one place.
    """
    debug = bool(os.environ.get("EHRPLAN_DEBUG"))
    try:
        app(args=argv, prog_name="ehrplan")
    except EhrplanError as e:
        if debug:
            raise
        sys.exit(_fail(str(e), e.exit_code))
    except KeyboardInterrupt:
        sys.exit(_fail("interrupted", EXIT_INTERRUPTED))
    except Exception as e:
        if debug:
            raise
        if isinstance(e, ModuleNotFoundError):
            missing = as_missing_extra(e, _command_label(argv))
            if missing is not None:
                sys.exit(_fail(str(missing), missing.exit_code))
        sys.exit(
            _fail(
                f"internal error: {type(e).__name__}: {e} (set EHRPLAN_DEBUG=1 for the traceback)",
                EXIT_INTERNAL,
            )
        )
