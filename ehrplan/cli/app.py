"""The `ehrplan` command: registers the command modules and maps errors to exit codes.

Every command is one entry of `COMMANDS`: the module under `ehrplan.cli` that holds it, and the
line `ehrplan --help` lists for it. A command's module is imported only when that command runs
(or its own `--help` is asked for), so `ehrplan estimate` pays for the estimate's imports alone
and `ehrplan --help` for none. A command needs the `train` extra (torch, numpy, pyarrow, ...)
unless its entry says ``planner=True``; run without the extra installed, it stops with one line
naming the extra (exit 2) before any of its work. A new command gets this by being registered.

Set ``EHRPLAN_DEBUG=1`` (or true, yes) to get the full traceback of any error beside its line;
the exit code stays the same.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import re
import sys
import traceback
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError
from typer.core import TyperCommand, TyperGroup
from typer.exceptions import Abort

from ehrplan.cli.extras import as_missing_extra, require_train_extra
from ehrplan.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EhrplanError

# Pydantic looks for plugins in the entry points of every installed distribution when it builds
# its first model: 19 of the 55 ms `import ehrplan.plan.config` took here under cProfile, in a
# venv of 66 distributions. ehrplan uses no Pydantic plugin; a value the user set stands.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

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
    "calibrate": Command(
        "calibrate",
        "calibrate",
        "Fit the memory terms the estimator cannot know from first principles for this device.",
    ),
    "predict": Command(
        "predict",
        "predict",
        "Predict every label row of one split with a run's best checkpoint.",
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
    _reflow_help(cmd)
    return cmd


_LIST_ITEM = re.compile(r"^(- |\* |\d+\. )")


def reflow(text: str) -> str:
    """A docstring's paragraphs as one line each (list items one line per item), so that Rich
    wraps them to the terminal: Typer's rich mode keeps the source's line breaks, which leaves
    ragged lines at any width but the source's. A paragraph starting with ``\\b`` is kept as
    written."""
    out = []
    for para in inspect.cleandoc(text).split("\n\n"):
        if para.startswith("\b"):
            out.append(para)
            continue
        items: list[str] = []
        for line in para.splitlines():
            if not items or _LIST_ITEM.match(line.strip()):
                items.append(line.strip())
            else:
                items[-1] += " " + line.strip()
        out.append("\n".join(items))
    return "\n\n".join(out)


def _reflow_help(cmd: Any) -> None:
    """`reflow` the help of a command and of every command of a group, recursively."""
    if cmd.help:
        cmd.help = reflow(cmd.help)
    for sub in (getattr(cmd, "commands", None) or {}).values():
        _reflow_help(sub)


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


DEBUG_ENV = "EHRPLAN_DEBUG"
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader left


def debug_enabled() -> bool:
    """``EHRPLAN_DEBUG`` is on for 1, true or yes (any case) and off for anything else."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


class StdoutClosed(Exception):
    """The reader of stdout went away (``ehrplan presets | head -1``). Not an `OSError`, so no
    handler on the way up mistakes it for a failed write of ours."""


class _GuardedStdout:
    """sys.stdout as the commands see it: a closed pipe raises `StdoutClosed`."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def write(self, text: str) -> int:
        try:
            return int(self._inner.write(text))
        except BrokenPipeError:
            raise StdoutClosed from None

    def flush(self) -> None:
        try:
            self._inner.flush()
        except BrokenPipeError:
            raise StdoutClosed from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _fail(message: str, code: int) -> int:
    """One line on stderr (none for an empty message: a torchrun rank other than 0)."""
    line = " ".join(str(message).split())  # always one line
    if line:
        prefix = "" if code == EXIT_INTERRUPTED else "error: "
        with contextlib.suppress(OSError, ValueError):
            print(f"{prefix}{line}", file=sys.stderr)
    return code


def _command_label(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    words = [a for a in args if not a.startswith("-")][:1]
    return " ".join(["ehrplan", *words])


def _usage_line(e: ClickException) -> str:
    """A usage error as one line, with the command whose --help explains it."""
    ctx = getattr(e, "ctx", None)
    command = ctx.command_path if ctx is not None else "ehrplan"
    return f"{e.format_message()} (see '{command} --help')"


def _tolerant_streams() -> None:
    """A terminal whose encoding is not UTF-8 gets '?' for what it cannot show, not a crash."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if reconfigure is not None and encoding not in ("utf8", "utf_8"):
            with contextlib.suppress(ValueError, OSError):  # a detached or closed stream
                reconfigure(errors="replace")


def _silence_stdout() -> None:
    """After the reader left: point stdout at /dev/null, so the interpreter's final flush of
    what is still buffered does not fail too."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def run(argv: list[str] | None = None) -> int:
    """Run the app on ``argv`` (default: the command line); return the exit code.

    Every way out passes through here: usage errors (wrong type, out of range, unknown option or
    command, missing argument) and ehrplan's own errors become one line on stderr with their exit
    code; a closed stdout exits quietly with 141; Ctrl-C exits 130. With ``EHRPLAN_DEBUG`` on the
    traceback is printed as well, and the exit code stays the same.
    """
    debug = debug_enabled()
    _tolerant_streams()
    real_stdout = sys.stdout
    sys.stdout = _GuardedStdout(real_stdout)
    try:
        try:
            rv = app(args=argv, prog_name="ehrplan", standalone_mode=False)
            sys.stdout.flush()
        finally:
            sys.stdout = real_stdout
    except StdoutClosed:
        _silence_stdout()
        return EXIT_PIPE_CLOSED
    except NoArgsIsHelpError as e:  # `ehrplan` alone: the help, as before
        print(e.format_message())
        return e.exit_code
    except ClickException as e:
        if debug:
            traceback.print_exc()
        return _fail(_usage_line(e), e.exit_code)
    except Abort:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except EhrplanError as e:
        if debug:
            traceback.print_exc()
        return _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except Exception as e:
        if debug:
            traceback.print_exc()
        if isinstance(e, ModuleNotFoundError):
            missing = as_missing_extra(e, _command_label(argv))
            if missing is not None:
                return _fail(str(missing), missing.exit_code)
        return _fail(
            f"internal error: {type(e).__name__}: {e} (set {DEBUG_ENV}=1 for the traceback)",
            EXIT_INTERNAL,
        )
    if rv == EXIT_INTERRUPTED:  # Typer turns Ctrl-C into a silent Exit(130); ours say so
        return _fail("interrupted", EXIT_INTERRUPTED)
    return rv if isinstance(rv, int) else 0


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: `run`, then exit with its code."""
    sys.exit(run(argv))
