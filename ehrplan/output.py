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

GIB = 1024**3  # GiB = 1024^3 bytes; GB = 10^9 bytes
MIB = 1024**2


def stdout() -> Console:
    return Console(file=sys.stdout, soft_wrap=True)


def stderr() -> Console:
    return Console(file=sys.stderr, soft_wrap=True)


def fmt_bytes(n: float | None) -> str:
    """Human-readable bytes in binary units (MiB below 1 GiB, GiB above)."""
    if n is None:
        return "-"
    if abs(n) >= GIB:
        return f"{n / GIB:,.2f} GiB"
    return f"{n / MIB:,.1f} MiB"


def fmt_count(n: int) -> str:
    """An integer with thousands separators and its size in millions."""
    return f"{n:,} ({n / 1e6:.2f} M)"


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
