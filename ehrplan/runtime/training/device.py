"""Which device and which precision a run trains on."""

from __future__ import annotations

from typing import Literal

import torch

from ehrplan.plan.config import EHRModelConfig
from ehrplan.plan.target import DeviceTarget

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


def device_target(device: torch.device) -> DeviceTarget:
    """The device as the planner sees it (`ehrplan.plan.target`): a CUDA device by the compute
    capability torch reports (not ``torch.cuda.is_bf16_supported()``, which is True on a T4
    that only emulates bf16), the Apple GPU, or this machine's CPU from the hardware probe."""
    from ehrplan.plan import target
    from ehrplan.plan.hardware import probe

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return target.cuda(torch.cuda.get_device_name(device), f"{major}.{minor}")
    return target.from_probe(probe(), device.type)


def resolve_precision(config: EHRModelConfig, device: torch.device, requested: str) -> Precision:
    """The planner's rule (`ehrplan.plan.target.resolve`): the run trains what was estimated."""
    from ehrplan.plan.target import resolve

    return resolve(config, device_target(device), requested).precision  # type: ignore[return-value]


def precision_reason(config: EHRModelConfig, device: torch.device, requested: str) -> str:
    """The words every command prints: ``bf16 on cuda: mixed_precision = true; ...``."""
    from ehrplan.plan.target import resolve

    return resolve(config, device_target(device), requested).describe()


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
