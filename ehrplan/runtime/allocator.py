"""How the process's heap behaves, so that its resident memory follows live tensor memory.

glibc's malloc serves large blocks from the heap, keeps what is freed for reuse and raises its
mmap threshold dynamically up to 32 MiB, so after a few steps a freed activation stays resident:
a Transformer step whose live peak was 420 MB grew the process by 1.25-1.44 GB
(shared/docs/memory-truth.md). `configure` fixes the mmap threshold (blocks of 1 MiB and more
are mapped and given back on free) and the trim threshold, through ``mallopt``; `trim` returns the
heap's free top to the system. `ehrplan train` and `ehrplan dry-run` call `configure` before the
model is built; the trainer calls `trim` every `TRIM_EVERY_STEPS` optimizer steps.
``EHRPLAN_MALLOC=default`` leaves glibc alone (``benchmarks/allocator_settings.py`` measures the
speed cost of the setting with it).

Elsewhere (macOS, musl) nothing is changed and `configure` says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from functools import lru_cache

#: mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks of this size and more are mmap'ed and unmapped when freed.
MMAP_THRESHOLD_BYTES = 1024 * 1024
#: Free heap top beyond this is returned to the system at once.
TRIM_THRESHOLD_BYTES = 4 * 1024 * 1024
#: The trainer calls `trim` every this many optimizer steps: ``malloc_trim`` walks the heap, and
#: at every step it cost tiny-lstm 1.58x its step time (``benchmarks/allocator_settings.py``).
TRIM_EVERY_STEPS = 50


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 - glibc only
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def configure() -> str:
    """Set the mmap and trim thresholds (glibc); returns what was done, in words."""
    if os.environ.get("EHRPLAN_MALLOC", "") == "default":
        return "allocator: glibc defaults (EHRPLAN_MALLOC=default)"
    libc = _libc()
    if libc is None:
        return "allocator: unchanged (not glibc)"
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if not ok:
        return "allocator: unchanged (mallopt refused)"
    return (
        f"allocator: glibc mmap threshold {MMAP_THRESHOLD_BYTES // 1024} KiB, trim threshold "
        f"{TRIM_THRESHOLD_BYTES // 1024} KiB"
    )


def trim() -> None:
    """Give the heap's free memory back to the system (glibc ``malloc_trim(0)``)."""
    if os.environ.get("EHRPLAN_MALLOC", "") == "default":
        return
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
