"""Analytic floating-point operations of one training step (no torch import).

Counts the matrix products, as ``torch.utils.flop_counter.FlopCounterMode`` does: 2 x m x n x k
per product (one multiply and one add; PaLM appendix B, nanoGPT's ``estimate_mfu``).
Element-wise work (activations, norms, the LSTM's gate non-linearities, Adam) is left out; it
is small beside the products and memory-bound anyway. A training step is the forward pass plus
a backward pass that costs twice the forward (the gradient of each product's input and of its
weight), less the input gradient of products whose input needs none (the time features);
checkpointing recomputes the checkpointed forward once more. ``tests/test_flops.py`` checks the
totals against ``FlopCounterMode`` on the built models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ehrplan.plan.config import EHRModelConfig


def mm(m: int, n: int, k: int) -> int:
    """FLOPs of an [m, k] x [k, n] product."""
    return 2 * m * n * k


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one micro-batch's forward, backward and recomputation, and of an optimizer step."""

    forward_by_module: dict[str, int] = field(default_factory=dict)
    forward: int = 0
    backward: int = 0
    recompute: int = 0
    micro_batches: int = 1

    @property
    def per_micro_batch(self) -> int:
        return self.forward + self.backward + self.recompute

    @property
    def per_optimizer_step(self) -> int:
        return self.per_micro_batch * self.micro_batches


def training_step_flops(
    config: EHRModelConfig,
    *,
    batch_size: int | None = None,
    checkpointing: bool | None = None,
    visits: int | None = None,
    codes: int | None = None,
) -> StepFlops:
    """FLOPs of a training step of ``config`` on a fully padded batch (every visit real)."""
    B = batch_size if batch_size is not None else config.batch_size
    V = visits or config.max_visits
    C = codes or config.max_codes_per_visit
    ckpt = config.use_checkpoint if checkpointing is None else checkpointing
    N = B * V  # real visits
    E, D, H, S = config.code_embed_dim, config.visit_embed_dim, config.hidden_dim, config.num_stages
    fwd: dict[str, int] = {}
    no_input_grad = 0  # forward FLOPs of products whose input needs no gradient
    if config.model_type == "lstm":
        # within-visit LSTM over N visits x C codes: x W_ih^T [E -> 4E] and h W_hh^T [E -> 4E]
        fwd["encoder.visit_lstm"] = mm(N * C, 4 * E, E) + mm(N * C, 4 * E, E)
        fwd["encoder.visit_projection"] = mm(N, D, E)  # last hidden state -> visit vector
        seq = 0
        for layer in range(config.num_layers):
            n_in = D + 2 if layer == 0 else H  # visit vector + 2 time features, then H
            seq += mm(N, 4 * H, n_in) + mm(N, 4 * H, H)  # input and recurrent projections
        fwd["encoder.sequence_lstm"] = seq
        # the first step's recurrent product reads h0 = 0, which needs no gradient
        no_input_grad = mm(N, 4 * E, E) + config.num_layers * mm(B, 4 * H, H)
        width = H
    else:
        hd = D // (config.num_heads or 1)
        fwd["encoder.visit_projection"] = mm(N, D, E)  # pooled codes -> visit vector
        fwd["encoder.time_projection"] = mm(N, D, 2)  # 2 time features -> D
        no_input_grad = fwd["encoder.time_projection"]
        heads = config.num_heads or 1
        block = (
            mm(N, 3 * D, D)  # fused q, k, v projection
            + heads * B * (mm(V, V, hd) + mm(V, hd, V))  # scores q k^T and weights x v
            + mm(N, D, D)  # output projection
            + mm(N, H, D)  # feed-forward in
            + mm(N, D, H)  # feed-forward out
        )
        fwd["encoder.layers"] = config.num_layers * block
        width = D
    fwd["heads"] = mm(N, S, width) + mm(N, 1, width)  # stage classifier + time regressor
    forward = sum(fwd.values())
    backward = 2 * forward - no_input_grad
    # checkpointed segments run their forward again in backward: everything but the heads and
    # the time projection (never checkpointed) and the visit projection, the last op of its
    # segment, whose output nothing saves (non-reentrant checkpointing stops before it)
    outside = fwd["heads"] + fwd.get("encoder.time_projection", 0)
    recompute = forward - outside - fwd["encoder.visit_projection"] if ckpt else 0
    return StepFlops(
        forward_by_module=fwd,
        forward=forward,
        backward=backward,
        recompute=recompute,
        micro_batches=config.gradient_accumulation_steps,
    )
