"""Writing files so that no reader ever sees one half-written (no torch).

Every file ehrplan writes (checkpoints, run records, MEDS parquet and JSON, embeddings, plots)
goes through `atomic_path`: the content is written to a temporary file in the same directory,
flushed to disk, then ``os.replace``d over the target, which is atomic on POSIX and Windows. A
crash, Ctrl-C or SIGKILL leaves either the old file or the new one; a failed write removes its
temporary file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the data is on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, doc: Any, *, sort_keys: bool = False) -> None:
    """Indented JSON and a final newline; ``sort_keys`` for byte-identical output."""
    write_text(path, json.dumps(doc, indent=2, default=str, sort_keys=sort_keys) + "\n")
