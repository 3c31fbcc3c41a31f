"""The one output sink: a Rich rendering for people, JSON for machines.

Data goes to stdout; hints, warnings and errors go to stderr. Every JSON document carries
``schema_version`` (bumped on any incompatible change) and ``command``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # rich is imported when something is printed for people, not for --json
    from rich.console import Console, RenderableType

SCHEMA_VERSION = 1


def stdout() -> Console:
    from rich.console import Console

    return Console(file=sys.stdout, soft_wrap=True)


def stderr() -> Console:
    from rich.console import Console

    return Console(file=sys.stderr, soft_wrap=True)


def emit(
    command: str,
    payload: dict[str, Any],
    *,
    as_json: bool,
    render: Callable[[dict[str, Any]], Iterable[RenderableType]],
) -> None:
    """Print ``payload`` as JSON (``as_json``) or as the renderables ``render`` builds from it.

    The JSON document is ``payload`` passed through the command's response model
    (`ehrplan.cli.schemas`): what `ehrplan schema COMMAND` describes is what is printed.
    """
    if as_json:
        write_json(document(command, payload))
        return
    console = stdout()
    for item in render(payload):
        console.print(item)


def document(command: str, payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` as ``command``'s JSON document, checked against its response model.

    A key the model lacks, a missing key, a wrong type or a non-finite number is a bug of
    ehrplan's (exit 70), reported in one line.
    """
    from pydantic import ValidationError

    from ehrplan.cli.schemas import response_model

    doc = {"schema_version": SCHEMA_VERSION, "command": command, **payload}
    try:
        model = response_model(command).model_validate(doc)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise RuntimeError(
            f"the --json output of '{command}' does not match its schema ({e.error_count()} "
            f"error(s)); first: {where}: {first['msg']}"
        ) from None
    return model.model_dump(mode="json", by_alias=True, exclude_unset=True)


def write_json(doc: Any) -> None:
    """One JSON document on stdout; never a bare NaN or Infinity (not JSON)."""
    sys.stdout.write(json.dumps(doc, indent=2, allow_nan=False) + "\n")


def write_text(text: str) -> None:
    """Machine-read text (GitHub annotations, JUnit XML) on stdout, as it is."""
    sys.stdout.write(text + "\n")


def say(message: str) -> None:
    """A progress line for people (e.g. building a cache), on stderr."""
    stderr().print(message, highlight=False)


def warn(message: str) -> None:
    """A hint or warning for people, on stderr."""
    stderr().print(f"[yellow]warning:[/] {message}", highlight=False)
