"""Checkpoints: written atomically, loaded with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and primitive containers (dicts, lists, str, int, float, bool,
None) so the safe unpickler accepts it: the config is a dict, RNG states are uint8 tensors.

Atomic write through `ehrplan.atomic.atomic_path`: a crash or SIGKILL at any moment leaves either
the old complete file or the new complete file, never half of one.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any

import torch

from ehrplan.atomic import atomic_path
from ehrplan.errors import UsageError

FORMAT_VERSION = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` ``state`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save({"format_version": FORMAT_VERSION, **state}, f)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with the safe unpickler; a missing or broken file is a `UsageError`."""
    if not path.is_file():
        raise UsageError(f"no checkpoint to resume from: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise UsageError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"{path} is not an ehrplan checkpoint (format {FORMAT_VERSION})")
    return state


# --------------------------------------------------------------------------------------------
# random number generator states, as tensors and primitives


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from: torch's CPU and CUDA generators, and Python's ``random``."""
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [py_version, list(py_state), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        with contextlib.suppress(RuntimeError):
            torch.mps.set_rng_state(state["mps"])
