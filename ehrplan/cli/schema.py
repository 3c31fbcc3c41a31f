"""`ehrplan schema COMMAND`: the JSON Schema of a command's ``--json`` output.

Generated from the Pydantic response models (`ehrplan.cli.schemas`) that every ``--json``
document passes through, so it always describes what the command prints. Never imports torch.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ehrplan.cli.output import stdout, write_json
from ehrplan.errors import UsageError

CommandArg = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="COMMAND",
        help="A command, e.g. validate, estimate, 'data stats' (or data-stats). "
        "Without one: the list of commands.",
        show_default=False,
    ),
]


def schema(command: CommandArg = None) -> None:
    """Print the JSON Schema (draft 2020-12) of COMMAND's --json output.

    For CI: check a stored `ehrplan validate --json` report, or generate types from it.
    """
    from ehrplan.cli.schemas import MODELS, json_schema

    if not command:
        for name in MODELS:
            stdout().print(name, highlight=False)
        return
    name = " ".join(command).replace("data-stats", "data stats")
    if name not in MODELS:
        raise UsageError(f"no --json schema for '{name}' (commands: {', '.join(MODELS)})")
    write_json(json_schema(name))
