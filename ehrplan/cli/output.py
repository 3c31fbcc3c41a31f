"""The one output sink: a Rich rendering for people, JSON for machines.

Data goes to stdout; hints, warnings and errors go to stderr. Every JSON document carries
``schema_version`` (bumped on any incompatible change) and ``command``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from typing import Any

from rich.console import Console, RenderableType

SCHEMA_VERSION = 1


def stdout() -> Console:
    return Console(file=sys.stdout, soft_wrap=True)


def stderr() -> Console:
    return Console(file=sys.stderr, soft_wrap=True)


def emit(
    command: str,
    payload: dict[str, Any],
    *,
    as_json: bool,
    render: Callable[[dict[str, Any]], Iterable[RenderableType]],
) -> None:
    """Print ``payload`` as JSON (``as_json``) or as the renderables ``render`` builds from it."""
    if as_json:
        doc = {"schema_version": SCHEMA_VERSION, "command": command, **payload}
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
        return
    console = stdout()
    for item in render(payload):
        console.print(item)


def warn(message: str) -> None:
    """A hint or warning for people, on stderr."""
    stderr().print(f"[yellow]warning:[/] {message}", highlight=False)
