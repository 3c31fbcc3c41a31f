"""Exact, analytic parameter counts of the models in `ehrplan.runtime.models` (no torch import).

Each term names the tensors it counts; `tests/test_params.py` checks the total against
``sum(p.numel() for p in model.parameters())`` for every preset and hundreds of random configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ehrplan.plan.config import EHRModelConfig

#: Component names, in the order they are reported.
COMPONENTS: tuple[str, ...] = ("embeddings", "within_visit_encoder", "visit_encoder", "heads")


def linear(n_in: int, n_out: int, bias: bool = True) -> int:
    """nn.Linear: weight [n_out, n_in] + bias [n_out]."""
    return n_in * n_out + (n_out if bias else 0)


def lstm_layer(n_in: int, hidden: int) -> int:
    """One unidirectional nn.LSTM layer: weight_ih [4h, in], weight_hh [4h, h], bias_ih, bias_hh."""
    return 4 * hidden * (n_in + hidden) + 2 * 4 * hidden


def layer_norm(dim: int) -> int:
    """nn.LayerNorm: weight [dim] + bias [dim]."""
    return 2 * dim


def transformer_block(d_model: int, d_ff: int) -> int:
    """One pre-LN block of `ehrplan.runtime.models.transformer`: two LayerNorms, fused qkv
    projection [3d, d] + bias, output projection [d, d] + bias, and the feed-forward pair
    d -> d_ff -> d."""
    return (
        2 * layer_norm(d_model)
        + linear(d_model, 3 * d_model)
        + linear(d_model, d_model)
        + linear(d_model, d_ff)
        + linear(d_ff, d_model)
    )


@dataclass(frozen=True)
class ParamBreakdown:
    """Parameter counts per module and per reported component."""

    modules: dict[str, int] = field(default_factory=dict)
    """Count per module, keyed by the module's attribute path in the built model."""
    components: dict[str, int] = field(default_factory=dict)
    """Count per component (embeddings, within-visit encoder, visit encoder, heads)."""

    frozen: int = 0
    """Parameters that get no gradient (the code embeddings when ``freeze_embeddings``)."""

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def trainable(self) -> int:
        """Parameters that get a gradient and optimizer state."""
        return self.total - self.frozen


def _heads(c: EHRModelConfig, width: int) -> dict[str, int]:
    # stage_classifier: Linear(width, num_stages); time_to_progression: Linear(width, 1)
    return {
        "heads.stage_classifier": linear(width, c.num_stages),
        "heads.time_to_progression": linear(width, 1),
    }


def count_parameters(c: EHRModelConfig) -> ParamBreakdown:
    """The exact parameter count of `ehrplan.runtime.models.build_model(c)`, by module and
    component."""
    E, D, H = c.code_embed_dim, c.visit_embed_dim, c.hidden_dim
    emb = {"encoder.code_embeddings": c.vocab_size * E}  # nn.Embedding [vocab, E]
    if c.model_type == "lstm":
        within = {
            "encoder.visit_lstm": lstm_layer(E, E),  # codes within a visit, hidden = E
            "encoder.visit_projection": linear(E, D),
        }
        # sequence LSTM: first layer reads the visit vector plus two time features
        visit = {"encoder.sequence_lstm": lstm_layer(D + 2, H)}
        visit["encoder.sequence_lstm"] += (c.num_layers - 1) * lstm_layer(H, H)
        heads = _heads(c, H)
    else:
        within = {"encoder.visit_projection": linear(E, D)}  # masked mean pool has no weights
        visit = {
            "encoder.time_projection": linear(2, D),
            "encoder.position_embeddings": c.max_visits * D,  # nn.Embedding [max_visits, D]
            "encoder.layers": c.num_layers * transformer_block(D, H),
            "encoder.final_norm": layer_norm(D),
        }
        heads = _heads(c, D)
    groups = dict(zip(COMPONENTS, (emb, within, visit, heads), strict=True))
    modules = {k: v for g in groups.values() for k, v in g.items()}
    components = {name: sum(g.values()) for name, g in groups.items()}
    frozen = components["embeddings"] if c.freeze_embeddings else 0
    return ParamBreakdown(modules=modules, components=components, frozen=frozen)
