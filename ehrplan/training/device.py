"""Which device and which precision a run trains on."""

from __future__ import annotations

from typing import Literal

import torch

from ehrplan.config import EHRModelConfig
from ehrplan.errors import DeviceError, UsageError

DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")
PRECISION_CHOICES: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16")
Precision = Literal["fp32", "fp16", "bf16"]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA if present, else MPS, else CPU; a named device must be present."""
    if name not in DEVICE_CHOICES:
        raise DeviceError(f"unknown device '{name}' (valid: {', '.join(DEVICE_CHOICES)})")
    cuda = torch.cuda.is_available()
    mps = torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if name == "cuda" and not cuda:
        raise DeviceError("device 'cuda' requested but no CUDA device is available")
    if name == "mps" and not mps:
        raise DeviceError("device 'mps' requested but Apple MPS is not available")
    return torch.device(name)


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
