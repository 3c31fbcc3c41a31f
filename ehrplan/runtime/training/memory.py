"""Memory as the trainer sees it: in use now, and the estimate for a data-shaped micro-batch."""

from __future__ import annotations

import torch

from ehrplan.plan.config import EHRModelConfig


def memory_in_use(device: torch.device) -> int:
    """Bytes in use now: allocated tensor bytes on CUDA/MPS, the process's RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.current_allocated_memory())
    import psutil

    return int(psutil.Process().memory_info().rss)


MEMORY_METHOD = {
    "cpu": "dispatcher live tensor bytes (as the dry run)",
    "cuda": "torch.cuda.max_memory_allocated",
}


def estimate_for_batch(
    config: EHRModelConfig,
    precision: str,
    device: str,
    B: int,
    V: int,
    C: int,
    groups: list[tuple[int, int]] | None = None,
) -> int:
    """The analytic peak for a micro-batch of ``B`` patients x ``V`` visits x ``C`` codes (the
    data-shaped batch, not the preset maxima), whose within-visit encoder runs ``groups``."""
    from ehrplan.plan.estimator import estimate_memory

    est = estimate_memory(
        config, precision=precision, device=device, batch_size=B, visits=V, codes=C,
        visit_groups=groups,
    )  # fmt: skip
    return int(est.total_bytes)
