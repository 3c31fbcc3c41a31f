"""Analytic memory estimate of one training step (no torch import).

Status: this module counts the *static* memory exactly — parameters, gradients and Adam's two
moment buffers, for fp32 and mixed precision. Activation memory is not modelled yet (the memory
issue adds it), so ``total_bytes`` is a lower bound on the real peak and says so in ``notes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ehrplan.config import EHRModelConfig
from ehrplan.params import count_parameters

Precision = Literal["fp32", "fp16", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
Device = Literal["cpu", "cuda", "mps"]
DEVICES: tuple[str, ...] = ("cpu", "cuda", "mps")

FP32 = 4  # bytes per element
HALF = 2  # fp16 / bf16


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak training-step memory, in bytes, by what holds it."""

    precision: str
    device: str
    batch_size: int
    checkpointing: bool
    breakdown: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.breakdown.values())

    @property
    def is_lower_bound(self) -> bool:
        return "activations" not in self.breakdown


def static_memory(config: EHRModelConfig, precision: str = "fp32") -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state for one model.

    - parameters: fp32 in every precision (autocast keeps fp32 master weights)
    - gradients: one fp32 ``.grad`` per parameter, same dtype as the parameter
    - optimizer_state: Adam's ``exp_avg`` and ``exp_avg_sq``, fp32, two per parameter
      (the scalar ``step`` tensors are negligible and left out)
    - autocast_weight_copies (mixed precision only): autocast casts each weight a matmul reads
      (LSTM and Linear weights, not embeddings) to 16 bits and caches the copy for the step
    """
    p = count_parameters(config)
    n = p.total
    out = {"parameters": FP32 * n, "gradients": FP32 * n, "optimizer_state": 2 * FP32 * n}
    if precision != "fp32":
        matmul_params = n - p.components["embeddings"]
        if config.model_type == "transformer":
            matmul_params -= config.max_visits * config.visit_embed_dim  # position embeddings
        out["autocast_weight_copies"] = HALF * matmul_params
    return out


def estimate_memory(
    config: EHRModelConfig,
    *,
    precision: str = "fp32",
    device: str = "cpu",
    batch_size: int | None = None,
    checkpointing: bool | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory of one training step of ``config`` on ``device``."""
    return MemoryEstimate(
        precision=precision,
        device=device,
        batch_size=batch_size if batch_size is not None else config.batch_size,
        checkpointing=config.use_checkpoint if checkpointing is None else checkpointing,
        breakdown=static_memory(config, precision),
        notes=["activation memory is not modelled yet: the total is a lower bound"],
    )
