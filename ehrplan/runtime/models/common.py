"""Pieces both model families share: input contract, visit gathering, checkpointing, heads.

Input contract (what `ehrplan.data`'s collate produces):

- ``patient_visits``: int64 ``[batch, visits, codes]`` code ids, PAD = 0. Within a visit the real
  codes come first and padding after; visits are left-aligned too (padded visits at the end).
- ``time_features``: float ``[batch, visits, 2]`` (scaled days since previous / first visit).
- ``visit_mask``: bool (or 0/1) ``[batch, visits, codes]``, True where a code is real. A visit
  with no real code is empty; empty visits contribute nothing to the within-visit encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def maybe_checkpoint(enabled: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)``, under non-reentrant activation checkpointing when ``enabled``."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def real_visits(visit_mask: torch.Tensor) -> torch.Tensor:
    """Per visit, whether it has at least one real code: bool ``[B, V]``."""
    return visit_mask.to(torch.bool).any(-1)


def last_real(sequence: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``sequence [B, V, D]`` at each patient's last non-empty visit (visit 0 if none)."""
    B, V = real.shape
    positions = torch.arange(1, V + 1, device=real.device)
    last = (real * positions).amax(-1).clamp(min=1) - 1
    return sequence[torch.arange(B, device=sequence.device), last]


def scatter_visits(values: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Place per-real-visit rows ``[N, D]`` back into a zero ``[B, V, D]`` grid."""
    B, V = real.shape
    out = values.new_zeros(B, V, values.shape[-1])
    return out.index_put((real,), values)


class ProgressionHeads(nn.Module):
    """Dropout, then a stage classifier and a time-to-progression regressor at every visit.

    ``time_pred`` is ``softplus`` of a linear map: positive like the seed's ``relu``, but without
    the dead zone where ``relu`` passes no gradient.
    """

    def __init__(self, width: int, num_stages: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.stage_classifier = nn.Linear(width, num_stages)
        self.time_to_progression = nn.Linear(width, 1)

    def forward(self, sequence_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.dropout(sequence_output)
        return self.stage_classifier(x), F.softplus(self.time_to_progression(x))
