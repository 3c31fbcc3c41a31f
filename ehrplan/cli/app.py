"""The `ehrplan` command: assembles the command modules and maps errors to exit codes.

Set ``EHRPLAN_DEBUG=1`` to get the full traceback of any error instead of one line.
"""

from __future__ import annotations

import os
import sys

import typer

from ehrplan.cli import compare as compare_cmd
from ehrplan.cli import dryrun, estimate, presets
from ehrplan.cli import embeddings as embeddings_cmd
from ehrplan.cli import hardware as hardware_cmd
from ehrplan.cli import recommend as recommend_cmd
from ehrplan.cli import schema as schema_cmd
from ehrplan.cli import synth as synth_cmd
from ehrplan.cli import train as train_cmd
from ehrplan.cli import validate as validate_cmd
from ehrplan.cli.data import data_app
from ehrplan.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EhrplanError

app = typer.Typer(
    name="ehrplan",
    help="Which EHR sequence model fits your machine: estimate it, prove it with a dry run, "
    "then train it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
app.command("presets")(presets.presets)
app.command("estimate")(estimate.estimate)
app.command("synth")(synth_cmd.synth)
app.command("dry-run")(dryrun.dry_run)
app.add_typer(data_app, name="data")
app.command("hardware")(hardware_cmd.hardware)
app.command("recommend")(recommend_cmd.recommend)
app.command("validate")(validate_cmd.validate)
app.command("train")(train_cmd.train)
app.command("compare")(compare_cmd.compare)
app.command("export-embeddings")(embeddings_cmd.export_embeddings)
app.command("schema")(schema_cmd.schema)


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


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
        sys.exit(
            _fail(
                f"internal error: {type(e).__name__}: {e} (set EHRPLAN_DEBUG=1 for the traceback)",
                EXIT_INTERNAL,
            )
        )
