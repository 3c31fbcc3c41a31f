"""The Transformer variant (the seed gives only its constructor; this is the design).

Within a visit, codes are a *set* (their order in the record carries no meaning), so the visit
encoder is permutation-invariant: the code embeddings of the visit's real codes are mean-pooled
(padding excluded by the mask) and projected to ``d_model = visit_embed_dim``. To each visit vector
we add a projection of the two time features and a learned position embedding (``max_visits``
positions). Over visits, ``num_layers`` pre-LayerNorm blocks, built one by one (not with
``nn.TransformerEncoder``, which deep-copies its layer and breaks fake-tensor tracing):

    x = x + Dropout(CausalSelfAttention(LayerNorm(x)))
    x = x + Dropout(Linear(GELU(Linear(LayerNorm(x)))))      # d_model -> hidden_dim -> d_model

then a final LayerNorm and the two heads of `ProgressionHeads`. Attention is causal: the prediction
at visit t sees visits <= t only. Padded visits sit after the real ones, so the causal mask alone
keeps them out of every real visit's view; an empty visit inside a record is kept as a visit with
time features and no codes.

``use_flash_attention=True`` calls ``scaled_dot_product_attention(is_causal=True)`` (fused
flash/memory-efficient kernels where the device has them); ``False`` materialises the
``[batch, heads, visits, visits]`` attention matrix explicitly, which is what the estimator models
for that case. On the CPU with dropout in training the explicit path is taken either way: SDPA has
no fused CPU kernel with dropout, and its math fallback upcasts to fp32 under autocast (-33% for
the estimate on one bf16 config; `benchmarks/cpu_attention_path.py`). ``use_checkpoint``
recomputes each block in backward.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ehrplan.runtime.models.common import (
    ProgressionHeads,
    last_real,
    maybe_checkpoint,
    real_visits,
    scatter_visits,
)

if TYPE_CHECKING:
    from ehrplan.plan.config import EHRModelConfig


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused qkv projection."""

    def __init__(self, d_model: int, num_heads: int, dropout: float, fused: bool) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide d_model={d_model}")
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.num_heads = num_heads
        self.dropout = dropout
        self.fused = fused
        #: On the CPU, fused SDPA with dropout runs its math fallback, which under autocast
        #: upcasts q, k, v and the attention matrices to fp32; the explicit path computes the
        #: same in the autocast dtype (benchmarks/cpu_attention_path.py measures both).
        self.explicit_on_cpu_dropout = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, V, D = x.shape
        q, k, v = self.qkv(x).view(B, V, 3, self.num_heads, D // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, V, head_dim]
        p = self.dropout if self.training else 0.0
        explicit = p > 0 and x.device.type == "cpu" and self.explicit_on_cpu_dropout
        if self.fused and not explicit:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
            causal = torch.ones(V, V, dtype=torch.bool, device=x.device).triu(1)
            attn = F.dropout(scores.masked_fill(causal, float("-inf")).softmax(-1), p)
            y = attn @ v
        return self.out(y.transpose(1, 2).reshape(B, V, D))


class TransformerBlock(nn.Module):
    """Pre-LN block: causal self-attention and a GELU feed-forward, each with a residual."""

    def __init__(
        self, d_model: int, d_ff: int, num_heads: int, dropout: float, fused: bool
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, num_heads, dropout, fused)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff_in = nn.Linear(d_model, d_ff)
        self.ff_out = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x)))
        return x + self.dropout(self.ff_out(self.dropout(F.gelu(self.ff_in(self.norm2(x))))))


class TransformerVisitEncoder(nn.Module):
    """Set-pooled visit vectors, plus time and position, through a causal Transformer."""

    def __init__(
        self,
        vocab_size: int,
        code_embed_dim: int = 128,
        embed_dim: int = 256,
        hidden_dim: int = 512,
        num_layers: int = 4,
        num_heads: int = 4,
        max_visits: int = 50,
        dropout: float = 0.1,
        use_checkpoint: bool = False,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__()
        self.code_embeddings = nn.Embedding(vocab_size, code_embed_dim, padding_idx=0)
        self.visit_projection = nn.Linear(code_embed_dim, embed_dim)
        self.time_projection = nn.Linear(2, embed_dim)
        self.position_embeddings = nn.Embedding(max_visits, embed_dim)
        self.layers = nn.ModuleList(
            TransformerBlock(embed_dim, hidden_dim, num_heads, dropout, use_flash_attention)
            for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.max_visits = max_visits
        self.hidden_dim = embed_dim
        self.use_checkpoint = use_checkpoint

    def encode_visit(self, visit_codes: torch.Tensor, visit_mask: torch.Tensor) -> torch.Tensor:
        """Masked mean of the code embeddings of ``[N, codes]`` visits, projected: ``[N, D]``."""
        m = visit_mask.to(torch.bool).unsqueeze(-1)
        emb = self.code_embeddings(visit_codes).masked_fill(~m, 0.0)
        pooled = emb.sum(1) / m.sum(1).clamp(min=1)
        return self.visit_projection(pooled)

    def forward(
        self, patient_visits: torch.Tensor, time_features: torch.Tensor, visit_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``sequence_output [B, V, D]`` and ``final_hidden [B, D]``, the output at each
        patient's last non-empty visit."""
        V = patient_visits.shape[1]
        if V > self.max_visits:
            raise ValueError(f"{V} visits exceed max_visits={self.max_visits}; truncate first")
        real = real_visits(visit_mask)
        visit_vectors = maybe_checkpoint(
            self.use_checkpoint, self.encode_visit, patient_visits[real], visit_mask[real]
        )
        x = scatter_visits(visit_vectors, real)
        positions = torch.arange(V, device=x.device)
        x = (
            x
            + self.time_projection(time_features.to(x.dtype))
            + self.position_embeddings(positions)
        )
        x = self.dropout(x)
        for layer in self.layers:
            x = maybe_checkpoint(self.use_checkpoint, layer, x)
        x = self.final_norm(x)
        return x, last_real(x, real)


class TransformerProgressionModel(nn.Module):
    """Transformer disease-progression model: stage logits and time to progression per visit."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 256,
        hidden_dim: int = 512,
        num_stages: int = 5,
        num_layers: int = 4,
        num_heads: int = 4,
        dropout: float = 0.1,
        code_embed_dim: int = 128,
        max_visits: int = 50,
        use_checkpoint: bool = False,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = TransformerVisitEncoder(
            vocab_size=vocab_size,
            code_embed_dim=code_embed_dim,
            embed_dim=embed_dim,
            hidden_dim=hidden_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            max_visits=max_visits,
            dropout=dropout,
            use_checkpoint=use_checkpoint,
            use_flash_attention=use_flash_attention,
        )
        self.heads = ProgressionHeads(embed_dim, num_stages, dropout)

    @classmethod
    def from_config(cls, config: EHRModelConfig) -> TransformerProgressionModel:
        assert config.num_heads is not None  # guaranteed by EHRModelConfig's validator
        return cls(
            vocab_size=config.vocab_size,
            embed_dim=config.visit_embed_dim,
            hidden_dim=config.hidden_dim,
            num_stages=config.num_stages,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            dropout=config.dropout,
            code_embed_dim=config.code_embed_dim,
            max_visits=config.max_visits,
            use_checkpoint=config.use_checkpoint,
            use_flash_attention=config.use_flash_attention,
        )

    def forward(
        self, patient_visits: torch.Tensor, time_features: torch.Tensor, visit_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``stage_logits [B, V, num_stages]`` and ``time_pred [B, V, 1]``."""
        sequence_output, _ = self.encoder(patient_visits, time_features, visit_mask)
        return self.heads(sequence_output)
