"""What a training run keeps on disk: its files, and readers that survive a torn last write."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ehrplan.errors import DataError


@dataclass
class RunFiles:
    """Where a run keeps what it writes."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def last(self) -> Path:
        return self.root / "checkpoints" / "last.pt"

    @property
    def best(self) -> Path:
        return self.root / "checkpoints" / "best.pt"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``path``; a torn last line (SIGKILL mid-write) is dropped. Any other
    line that is not a JSON object is damage, refused in one line (`DataError`)."""
    if not path.is_file():
        return []
    lines = path.read_bytes().splitlines()
    out = []
    for i, raw in enumerate(lines, start=1):
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
        elif rec is not None or i < len(lines):  # not a torn last write
            raise DataError(
                f"{path} is damaged: line {i} is not a JSON object (move the file away to resume "
                "without its history)"
            )
    return out


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """A run folder's ``config.json``; a missing, damaged or foreign one is one `DataError`."""
    path = run_dir / "config.json"
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} is missing: {run_dir} holds no run to resume") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is damaged ({type(err).__name__}: {err})") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from None
    need = ("config", "config_requested", "source", "settings", "data")
    if not isinstance(doc, dict) or any(k not in doc for k in need):
        raise DataError(f"{path} is not an ehrplan run's config.json (it lacks {', '.join(need)})")
    return doc


def read_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return doc if isinstance(doc, list) else []
