"""Writing files so that no reader ever sees one half-written (no torch).

Every file ehrplan writes (checkpoints, run records, MEDS parquet and JSON, embeddings, plots)
goes through `atomic_path`: the content is written to a temporary file in the same directory,
flushed to disk, then ``os.replace``d over the target, which is atomic on POSIX and Windows. A
crash, Ctrl-C or SIGKILL leaves either the old file or the new one; a failed write removes its
temporary file, and a SIGKILL's leftovers (``.NAME.*.tmp``) are removed by `remove_stale_temps`
when a run starts or resumes.

Files and folders are created with the process umask (0644 and 0755 under umask 022), like any
other tool's output, so that a shared group can read cohorts, checkpoints and metrics;
``tempfile.mkstemp`` would make every file 0600.

A write that fails for a reason of the machine (disk full, read-only or missing folder, a file
where a folder should be) is an `OutputError`: one line naming the path, exit code 2.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ehrplan.errors import OutputError

TEMP_SUFFIX = ".tmp"


def output_error(path: Path | str, err: OSError) -> OutputError:
    """One line for a failed write of ``path``; a full disk is named as such."""
    reason = err.strerror or type(err).__name__
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"disk full: cannot write {path} ({reason})")
    return OutputError(f"cannot write {path}: {reason}")


def ensure_dir(path: Path | str) -> Path:
    """Create the folder ``path`` (and its parents) if needed; an `OutputError` if it cannot be
    (a file in the way, no permission, a read-only file system)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"cannot create the folder {path}: a file of that name exists") from None
    except NotADirectoryError:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), path)
        raise OutputError(f"cannot create the folder {path}: {blocker} is a file") from None
    except OSError as err:
        raise output_error(path, err) from None
    return path


def _temp_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path``."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder (give a file name)")
    ensure_dir(path.parent)
    tmp = _temp_name(path)
    try:
        # O_EXCL: a name of our own; mode 0o666 & ~umask, as open() would create it
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield tmp
        with open(tmp, "rb+") as f:  # the data is on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise output_error(path, err) from None
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` (mode 0777 & ~umask); when the block succeeds
    it is renamed to ``path`` (which must not exist, or be an empty folder)."""
    path = Path(path)
    ensure_dir(path.parent)
    tmp = _temp_name(path)
    try:
        tmp.mkdir()
        yield tmp
        if path.exists():
            path.rmdir()  # empty: the caller checked
        os.replace(tmp, path)
    except OSError as err:
        raise output_error(path, err) from None
    except OutputError as err:  # a file inside: name where it was going, not the temp folder
        raise OutputError(str(err).replace(str(tmp), str(path))) from None
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary files (``.NAME.*.tmp``) a killed writer left under ``folder``;
    return what was removed. Only a folder's single writer may call this (see the run lock)."""
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.rglob(f".*{TEMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, doc: Any, *, sort_keys: bool = False) -> None:
    """Indented JSON and a final newline; ``sort_keys`` for byte-identical output."""
    write_text(path, json.dumps(doc, indent=2, default=str, sort_keys=sort_keys) + "\n")
