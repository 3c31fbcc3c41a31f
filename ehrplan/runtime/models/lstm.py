"""The two-level LSTM of the seed document, with its three mistakes fixed.

Level 1 (within a visit): code embeddings -> one LSTM layer over the visit's codes (hidden =
``code_embed_dim``) -> the hidden state at the visit's *last real code* -> linear projection to
``visit_embed_dim``. Level 2 (over visits): visit vectors concatenated with two time features ->
a ``num_layers`` LSTM with ``hidden_dim`` units over the padded visit axis (causal, so trailing
padded visits cannot reach a real one; one fused oneDNN call instead of the per-step loop that a
packed sequence takes on the CPU).

What changed from the seed:

- The padding mask is honoured: the seed took ``hidden[-1]`` after running over the padding; here
  the state at the last real code is gathered, and empty visits are skipped entirely. Trailing
  padded or empty visits come after every real one, so the causal visit LSTM never sees them
  before a real visit; ``final_hidden`` is gathered at each patient's last real visit.
- All real visits of a batch go through the within-visit LSTM together instead of in a Python
  loop over visit positions: on the CPU sorted by their number of codes and cut into a few length
  groups, each padded only to its own longest visit (`ehrplan.plan.grouping`); elsewhere as one
  ``[N, codes]`` call over the N real visits.
- Gradient checkpointing (``use_checkpoint``) is a real option: both levels are recomputed in
  backward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ehrplan.plan.grouping import grouping_enabled, plan_groups
from ehrplan.runtime.models.common import (
    ProgressionHeads,
    last_real,
    maybe_checkpoint,
    real_visits,
    scatter_visits,
)

if TYPE_CHECKING:
    from ehrplan.plan.config import EHRModelConfig


class LSTMVisitEncoder(nn.Module):
    """Two-level LSTM encoder: codes within a visit -> visit vector; LSTM over visits."""

    def __init__(
        self,
        vocab_size: int,
        code_embed_dim: int = 128,
        visit_embed_dim: int = 256,
        hidden_dim: int = 512,
        num_layers: int = 2,
        dropout: float = 0.1,
        bidirectional: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if bidirectional:
            # A backward pass over visits would let visit t see visits after t.
            raise ValueError("bidirectional=True is not supported: predictions must be causal")
        self.code_embeddings = nn.Embedding(vocab_size, code_embed_dim, padding_idx=0)
        self.visit_lstm = nn.LSTM(code_embed_dim, code_embed_dim, num_layers=1, batch_first=True)
        self.visit_projection = nn.Linear(code_embed_dim, visit_embed_dim)
        self.sequence_lstm = nn.LSTM(
            visit_embed_dim + 2,
            hidden_dim,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(dropout)
        self.hidden_dim = hidden_dim
        self.use_checkpoint = use_checkpoint
        self.length_groups = True
        """Run the within-visit LSTM by length group where the device groups (`grouping`);
        False under FSDP, whose sharded LSTM would be all-gathered once per call, a number of
        calls that differs from rank to rank (the collectives would not match)."""

    def encode_visit(self, visit_codes: torch.Tensor, visit_mask: torch.Tensor) -> torch.Tensor:
        """Encode ``[N, codes]`` visits, each with at least one real code, to ``[N, visit_dim]``."""
        lengths = visit_mask.to(torch.bool).sum(-1)
        if self.length_groups and grouping_enabled(visit_codes.device.type) and lengths.numel() > 1:
            sorted_lengths, order = lengths.sort(descending=True, stable=True)
            groups = plan_groups(sorted_lengths.tolist())
            if len(groups) > 1:
                last = self._grouped_last(visit_codes, order, sorted_lengths, groups)
                return self.visit_projection(last)
        out, _ = self.visit_lstm(self.code_embeddings(visit_codes))  # [N, codes, E]
        last = out[torch.arange(out.shape[0], device=out.device), lengths - 1]
        return self.visit_projection(last)

    def _grouped_last(
        self,
        visit_codes: torch.Tensor,
        order: torch.Tensor,
        sorted_lengths: torch.Tensor,
        groups: list[tuple[int, int, int]],
    ) -> torch.Tensor:
        """The within-visit LSTM's state at each visit's last real code, ``[N, E]`` in the input
        order, computed group by group (``(start, end, length)`` over the visits sorted by
        length): one embedding lookup over every group's codes, one LSTM call per group."""
        codes = visit_codes[order]
        ids = torch.cat([codes[s:e, :length].reshape(-1) for s, e, length in groups])
        pieces = self.code_embeddings(ids).split([(e - s) * n for s, e, n in groups])
        lasts = []
        for (s, e, length), x in zip(groups, pieces, strict=True):
            out, _ = self.visit_lstm(x.view(e - s, length, -1))
            rows = torch.arange(e - s, device=out.device)
            lasts.append(out[rows, sorted_lengths[s:e] - 1])
        return torch.cat(lasts)[order.argsort()]

    def _sequence(self, visits: torch.Tensor, time_features: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.dropout(visits), time_features.to(visits.dtype)], dim=-1)
        out, _ = self.sequence_lstm(x)
        return out

    def forward(
        self, patient_visits: torch.Tensor, time_features: torch.Tensor, visit_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``sequence_output [B, V, hidden]`` and ``final_hidden [B, hidden]``: the top
        layer's state after each patient's last non-empty visit."""
        real = real_visits(visit_mask)
        visit_vectors = maybe_checkpoint(
            self.use_checkpoint, self.encode_visit, patient_visits[real], visit_mask[real]
        )
        visits = scatter_visits(visit_vectors, real)
        out = maybe_checkpoint(self.use_checkpoint, self._sequence, visits, time_features)
        return out, last_real(out, real)


class LSTMProgressionModel(nn.Module):
    """LSTM disease-progression model: stage logits and time to progression at every visit."""

    def __init__(
        self,
        vocab_size: int,
        code_embed_dim: int = 128,
        visit_embed_dim: int = 256,
        hidden_dim: int = 512,
        num_stages: int = 5,
        num_layers: int = 2,
        dropout: float = 0.1,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = LSTMVisitEncoder(
            vocab_size=vocab_size,
            code_embed_dim=code_embed_dim,
            visit_embed_dim=visit_embed_dim,
            hidden_dim=hidden_dim,
            num_layers=num_layers,
            dropout=dropout,
            use_checkpoint=use_checkpoint,
        )
        self.heads = ProgressionHeads(hidden_dim, num_stages, dropout)

    @classmethod
    def from_config(cls, config: EHRModelConfig) -> LSTMProgressionModel:
        return cls(
            vocab_size=config.vocab_size,
            code_embed_dim=config.code_embed_dim,
            visit_embed_dim=config.visit_embed_dim,
            hidden_dim=config.hidden_dim,
            num_stages=config.num_stages,
            num_layers=config.num_layers,
            dropout=config.dropout,
            use_checkpoint=config.use_checkpoint,
        )

    def forward(
        self, patient_visits: torch.Tensor, time_features: torch.Tensor, visit_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``stage_logits [B, V, num_stages]`` and ``time_pred [B, V, 1]``."""
        sequence_output, _ = self.encoder(patient_visits, time_features, visit_mask)
        return self.heads(sequence_output)
