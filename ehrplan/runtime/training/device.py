"""Which device and which precision a run trains on."""

from __future__ import annotations

from typing import Literal

import torch

from ehrplan.errors import UsageError
from ehrplan.plan.config import EHRModelConfig

DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")
PRECISION_CHOICES: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16")
Precision = Literal["fp32", "fp16", "bf16"]


def mps_recommended_max_memory() -> int | None:
    """Metal's recommended working set in bytes, from torch; None where MPS is unavailable.
    The hardware probe's ``mps_reader`` for ``--probe-mps``."""
    if not torch.backends.mps.is_available():
        return None
    return int(torch.mps.recommended_max_memory())


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA if present, else MPS, else CPU; a named device must be present (the dry
    run's rule, `ehrplan.runtime.measure.resolve_device`)."""
    from ehrplan.runtime.measure import resolve_device as measure_resolve

    return torch.device(measure_resolve(name))


def resolve_precision(config: EHRModelConfig, device: torch.device, requested: str) -> Precision:
    """``auto``: fp32 unless the config asks for mixed precision; then CUDA bf16 (fp16 with a grad
    scaler where bf16 is not supported), MPS fp16, and fp32 on the CPU (CPU bf16 autocast is
    slower than fp32 on most CPUs; ask for it with ``--precision bf16``)."""
    if requested not in PRECISION_CHOICES:
        raise UsageError(f"unknown precision '{requested}' (valid: {', '.join(PRECISION_CHOICES)})")
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            raise UsageError("fp16 autocast is not supported for training on the CPU; use bf16")
        return requested  # type: ignore[return-value]
    if not config.mixed_precision or device.type == "cpu":
        return "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp16"  # mps


def autocast_dtype(precision: Precision) -> torch.dtype | None:
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def auto_threads() -> int:
    """CPU threads for training: the cores nobody else is using, at least one.

    The LSTMs run thousands of small kernels per step, each ending at an OpenMP barrier; when
    other processes hold the cores, a thread that is descheduled stalls the others at every
    barrier and a 2-thread step can run many times slower than a 1-thread one. So take
    ``cores - round(1-minute load average)`` threads (at most torch's default).
    """
    import os

    cores = torch.get_num_threads()
    try:
        busy = round(os.getloadavg()[0])
    except OSError:  # pragma: no cover - not on every platform
        busy = 0
    return max(1, min(cores, cores - busy))
