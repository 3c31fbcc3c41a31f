"""Analytic peak memory of one training step (no torch import).

The estimate follows what the real kernels keep, tensor by tensor, and was checked against the
measured step of `ehrplan.runtime.measure` (dispatcher live tensor bytes, second step, Adam). A step
has a few moments where the live set can peak; each is modelled as a `Phase` (a breakdown of live
bytes by what holds them) and the estimate is the largest one:

- ``forward``: the start of backward, when every tensor saved for backward is alive;
- ``embedding_forward`` (Transformer): the ``[N, codes, E]`` embedding output and its masked
  copy, both alive for a moment at the start of the forward pass;
- ``within_visit_forward`` (native LSTM kernel): the end of its per-step loop;
- ``within_visit_backward`` (LSTM): inside the backward of the within-visit LSTM, whose oneDNN
  workspace is by far the largest saved tensor;
- ``sequence_backward`` (LSTM): inside the backward of the top visit-sequence LSTM layer;
- ``layer_backward`` (Transformer, checkpointing): one block recomputed inside backward;
- ``embedding_backward``: the dense gradient of the code embedding table is made while the
  gradient of the ``[N, codes, E]`` embedding output is alive;
- ``optimizer``: Adam's step, all gradients alive plus the temporaries of its largest update.

Gradient accumulation changes the micro-batch, not the memory per micro-batch, except that
from the second micro-batch on the accumulated gradients are alive during the forward pass
(`ehrplan.runtime.measure` runs two micro-batches when the config accumulates). Mixed precision
(autocast, fp32 master weights): matmul and LSTM outputs are 16-bit, the Transformer's
residual stream and the embeddings stay fp32, and the 16-bit weight copies live while saved.
Per-device overhead (CUDA context, allocator reserve) is reported in ``device_overhead``,
outside ``total_bytes``, as unmeasured assumptions: ``total_bytes`` predicts live tensor bytes
(what ``torch.cuda.max_memory_allocated`` measures on CUDA).

Notation: B patients per micro-batch, V visits, C codes per visit, N = B x V visits (all real at
full padding), E = code_embed_dim, D = visit_embed_dim, H = hidden_dim, L = num_layers,
S = num_stages, h = num_heads, P = parameters. Byte sizes: fp32 4, int64 8, bool 1.

Kernels: on the CPU both LSTMs run oneDNN's ``mkldnn_rnn_layer`` (packed sequences included)
unless ``torch.backends.mkldnn.enabled`` is False, when the native ATen LSTM runs instead
(``lstm_kernel="native"``). The workspace formula of `mkldnn_lstm_workspace` was fitted on
torch 2.13.0+cpu (rows and the command in ``benchmarks/data/mkldnn_lstm_workspace.csv``, made
by ``benchmarks/lstm_workspace.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from ehrplan.plan.config import EHRModelConfig
from ehrplan.plan.params import count_parameters
from ehrplan.plan.params import layer_norm as layer_norm_param_count
from ehrplan.plan.params import lstm_layer as lstm_layer_param_count
from ehrplan.plan.params import transformer_block as transformer_block_param_count

Precision = Literal["fp32", "fp16", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
Device = Literal["cpu", "cuda", "mps"]
DEVICES: tuple[str, ...] = ("cpu", "cuda", "mps")
LSTM_KERNELS: tuple[str, ...] = ("mkldnn", "native")

FP32 = 4  # bytes per element
HALF = 2  # fp16 / bf16
I64 = 8  # int64 ids and indices
BOOL = 1

MIB = 1024**2
#: CUDA context (driver, kernels, cuBLAS/cuDNN handles) outside torch's allocator. UNMEASURED
#: here (no GPU in this session): a documented assumption, typical of recent drivers.
CUDA_CONTEXT_BYTES = 500 * MIB
#: The CUDA caching allocator rounds blocks to 512 bytes and keeps freed blocks reserved;
#: reserved/allocated peaks of 1.05-1.2 are usual. UNMEASURED assumption for the reserve line.
CUDA_RESERVED_FACTOR = 1.10


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak training-step memory, in bytes, by what holds it."""

    precision: str
    device: str
    batch_size: int
    checkpointing: bool
    breakdown: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    peak_phase: str = ""
    """Which moment of the step the peak is at (see the module docstring)."""
    phases: dict[str, int] = field(default_factory=dict)
    """Total live bytes at every modelled moment; the peak is the largest."""
    saved_by_module: dict[str, int] = field(default_factory=dict)
    """Bytes each module saves for backward in the forward pass (no checkpointing)."""
    device_overhead: dict[str, int] = field(default_factory=dict)
    """Memory outside the live tensors (CUDA context, allocator reserve); not in the total."""
    lstm_gate_bytes: int = 0
    """fp32 bytes of the gates of the largest LSTM call (``4 x hidden`` per sequence and step):
    the basis of the kernel-scratch term of `ehrplan.plan.levels` (0 for the Transformer)."""

    @property
    def total_bytes(self) -> int:
        return sum(self.breakdown.values())


# ---------------------------------------------------------------------------------------------
# kernel-level formulas


def _onednn_ld(n: int, align: int = 16) -> int:
    """oneDNN's leading dimension for rows of ``n``: rounded up to 64 bytes (16 fp32 or 32 bf16
    elements, ``align``), plus one more such step when that is a multiple of 256 elements
    (avoids cache-set aliasing; ``get_good_ld``)."""
    ld = -(-n // align) * align
    return ld + align if ld % 256 == 0 else ld


def _pages(nbytes: int) -> int:
    """oneDNN starts each workspace section on a 4 KiB page."""
    return -(-nbytes // 4096) * 4096


def mkldnn_lstm_workspace(n: int, steps: int, n_in: int, hidden: int) -> int:
    """Bytes of the uint8 workspace one ``mkldnn_rnn_layer`` (one LSTM layer, fp32, training)
    returns and keeps for backward, for ``n`` sequences of ``steps`` steps.

    Seven page-aligned sections: the gates (``steps`` rows of ld(4H)), one H-row per step
    (ld(H)), three sections of two state rows per step + 1 (ld(max(in, H))) and two of two
    unpadded H-wide rows per step + 1. Matches every row of
    ``benchmarks/data/mkldnn_lstm_workspace.csv`` to the byte.
    """
    rows_states = 2 * (steps + 1) * n
    return (
        _pages(FP32 * n * steps * _onednn_ld(4 * hidden))  # gates
        + _pages(FP32 * n * steps * _onednn_ld(hidden))  # one hidden row per step
        + 3 * _pages(FP32 * rows_states * _onednn_ld(max(n_in, hidden)))  # layer/iter states
        + 2 * _pages(FP32 * rows_states * hidden)  # c states and their copies
    )


def mkldnn_lstm_workspace_bf16(n: int, steps: int, n_in: int, hidden: int) -> int:
    """Bytes of the oneDNN LSTM workspace under bf16 autocast (bf16 inputs and weights): per
    sequence, ``steps + 1`` rows of layer states (four fp32 rows of ld16(max(in, H)) and two
    bf16 rows of ld32(max(in, H))), per step the fp32 gates (ld(4H)), one bf16 row of
    ld32(H) and one fp32 row of H, plus three fp32 H-rows. Fitted on torch 2.13.0+cpu to the
    byte up to page alignment, for which eight half pages are added."""
    ld_in = max(n_in, hidden)
    per_seq = (
        (steps + 1) * (16 * _onednn_ld(ld_in) + 4 * _onednn_ld(ld_in, 32))
        + steps * (FP32 * _onednn_ld(4 * hidden) + 2 * _onednn_ld(hidden, 32) + FP32 * hidden)
        + 3 * FP32 * hidden
    )
    return n * per_seq + 8 * 2048


def lstm_layer_saved(
    n: int, steps: int, n_in: int, hidden: int, kernel: str, act: int = FP32
) -> int:
    """Bytes one LSTM layer keeps for backward beyond its input: output [steps, n, H],
    final h and c [n, H] (``act`` bytes each: 4 in fp32, 2 under autocast) and the kernel's
    own state (oneDNN workspace, or the native kernel's gates)."""
    out = act * n * steps * hidden + 2 * act * n * hidden  # output + (h_n, c_n)
    if kernel == "mkldnn":
        ws = mkldnn_lstm_workspace if act == FP32 else mkldnn_lstm_workspace_bf16
        return out + ws(n, steps, n_in, hidden)
    # native ATen LSTM (autograd through its per-step ops): per step and sequence it keeps
    # the four gate activations (4H), the cell state and its tanh (2H) and the previous
    # hidden state (H): 7H; measured exactly on torch 2.13.0+cpu (mkldnn disabled)
    return out + act * n * steps * 7 * hidden


# ---------------------------------------------------------------------------------------------
# phases


@dataclass
class _Dims:
    B: int
    V: int
    C: int
    micro: int
    groups: list[tuple[int, int]] | None = None
    """(visits, codes) of each within-visit length group; None: one group of all B x V visits."""

    @property
    def N(self) -> int:
        return self.B * self.V


def _inputs(d: _Dims) -> int:
    """The batch: codes int64 [B,V,C], code_mask bool [B,V,C], time_features fp32 [B,V,2],
    stage int64 [B,V], time_to_event fp32 [B,V], event_observed bool [B,V]."""
    return d.N * d.C * (I64 + BOOL) + d.N * (2 * FP32 + I64 + FP32 + BOOL)


def _static(config: EHRModelConfig, precision: str) -> tuple[dict[str, int], int, int]:
    """Static bytes, the count of parameters that get a gradient, and the element count of the
    largest parameter *tensor* Adam updates (its single-tensor update makes two temporaries of
    its size)."""
    p = count_parameters(config)
    return static_memory(config, precision), p.trainable, largest_updated_tensor(config)


def largest_updated_tensor(config: EHRModelConfig) -> int:
    """Elements of the largest parameter tensor Adam updates (its single-tensor update makes two
    temporaries of that size); a frozen code-embedding table is not updated."""
    E, D, H = config.code_embed_dim, config.visit_embed_dim, config.hidden_dim
    table = 0 if config.freeze_embeddings else config.vocab_size * E  # frozen: Adam skips it
    if config.model_type == "lstm":
        # embedding [vocab,E]; sequence LSTM weight_ih [4H, D+2] or weight_hh [4H, H];
        # visit LSTM weights [4E, E]; visit projection [D, E]
        return max(table, 4 * H * max(D + 2, H), 4 * E * E, E * D)
    # embedding [vocab,E]; fused qkv [3D, D]; feed-forward [H, D] and [D, H]
    return max(table, 3 * D * D, D * H, E * D)


def static_memory(config: EHRModelConfig, precision: str = "fp32") -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state for one model.

    - parameters: fp32 in every precision (autocast keeps fp32 master weights)
    - gradients: one fp32 ``.grad`` per trainable parameter, same dtype as the parameter
    - optimizer_state: Adam's ``exp_avg`` and ``exp_avg_sq``, fp32, two per trainable parameter
      (the scalar ``step`` tensors are negligible and left out)
    - a frozen code-embedding table (``freeze_embeddings``) is a parameter but gets neither a
      gradient nor optimizer state: it saves ``vocab_size x code_embed_dim x (4 + 8)`` bytes
    - autocast_weight_copies (mixed precision only): autocast casts each weight a matmul reads
      (LSTM and Linear weights, not embeddings) to 16 bits and caches the copy for the step
    """
    p = count_parameters(config)
    n, t = p.total, p.trainable  # t: parameters that get a gradient (frozen table excluded)
    out = {"parameters": FP32 * n, "gradients": FP32 * t, "optimizer_state": 2 * FP32 * t}
    if precision != "fp32":
        matmul_params = n - p.components["embeddings"]
        if config.model_type == "transformer":
            matmul_params -= config.max_visits * config.visit_embed_dim  # position embeddings
        out["autocast_weight_copies"] = HALF * matmul_params
    return out


def _phase(
    base: dict[str, int],
    inputs: int,
    grads: int,
    activations: int,
    temporaries: int,
    weight_copies: bool = True,
) -> dict[str, int]:
    out = {
        "parameters": base["parameters"],
        "optimizer_state": base["optimizer_state"],
        "gradients": grads,
        "inputs": inputs,
        "activations": activations,
        "temporaries": temporaries,
    }
    # autocast's 16-bit weight copies are saved for backward and freed with the saved tensors
    if weight_copies and "autocast_weight_copies" in base:
        out["autocast_weight_copies"] = base["autocast_weight_copies"]
    return out


def _lstm_phases(
    c: EHRModelConfig, d: _Dims, ckpt: bool, kernel: str, precision: str
) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    E, D, H, L, S = c.code_embed_dim, c.visit_embed_dim, c.hidden_dim, c.num_layers, c.num_stages
    N, B, V, C = d.N, d.B, d.V, d.C
    base, P, largest = _static(c, precision)
    P_emb = 0 if c.freeze_embeddings else c.vocab_size * E  # the table's share of P
    inputs = _inputs(d)
    grads_all = FP32 * P
    grads_before = grads_all if d.micro > 1 else 0  # accumulated grads live from micro-batch 2

    a = FP32 if precision == "fp32" else HALF  # bytes of a matmul/LSTM output under autocast
    # --- within-visit level: one LSTM call per length group (`ehrplan.plan.grouping`) of n visits
    # padded to L codes; without groups, one call over all N visits of C codes ---
    groups = d.groups or [(N, C)]
    Nw = sum(n for n, _ in groups)  # visits through the within-visit LSTM
    T = sum(n * L for n, L in groups)  # their code slots
    # ids: one group: codes[real] int64 [N,C] (the embedding's indices), index rows + lengths;
    # groups: the flat ids [T], per group its rows and last-code positions, the inverse order
    ids = I64 * T + (2 if len(groups) == 1 else 3) * I64 * Nw
    # per group: the LSTM's time-major input copy [L,n,E] and what the layer keeps
    group_saved = [a * n * L * E + lstm_layer_saved(n, L, E, E, kernel, a) for n, L in groups]
    visit_lstm = sum(group_saved)
    last = a * Nw * E  # each visit's state at its last code: visit_projection's input
    within = ids + visit_lstm + last
    # --- visit level ---
    p = c.dropout > 0
    # the visit vectors on the [B,V,D] grid (index_put output): no op saves them (index_put's
    # backward keeps the indices, dropout its mask, cat nothing), so they are alive only where
    # checkpointing keeps them as the sequence segment's input
    scatter = a * N * D
    drop_v = a * N * D if p else 0  # dropout mask (same dtype) [B,V,D]; its output is cat's
    packed = a * N * (D + 2)  # the LSTM's time-major copy of cat([visits, time]) [V,B,D+2]
    seq = 0
    for layer in range(L):
        n_in = D + 2 if layer == 0 else H
        seq += lstm_layer_saved(B, V, n_in, H, kernel, a)  # its output is the heads' input
        if layer > 0 and p:
            seq += 2 * a * N * H  # inter-layer dropout: mask + output [N,H]
    heads = (2 * a * N * H if p else 0) + a * N * (S + 2)  # dropout; logits; time+softplus
    visit_level = drop_v + packed + seq + heads
    saved = {
        "encoder.code_embeddings+indices": ids,
        "encoder.visit_lstm": visit_lstm,
        "encoder.visit_projection": last,
        "encoder.sequence_lstm": drop_v + packed + seq,
        "heads": heads,
    }

    phases: dict[str, dict[str, int]] = {}
    if kernel == "native":
        # the native kernel's forward peaks at its end: the embedding output and its
        # time-major copy (2E), the input projection [C,N,4E], every step's gates (4E), the
        # c-state products (2E), tanh(c) (E) and the stacked output (E), per visit and code
        phases["within_visit_forward"] = _phase(
            base, inputs, grads_before, ids, a * N * C * (2 * E + 12 * E)
        )  # fmt: skip
    grads_no_emb = FP32 * (P - P_emb)
    # checkpointing keeps only segment inputs: the real visits' [N,C] codes (and mask) and the
    # [B,V,D] visit vectors
    seg_ids = I64 * Nw * C + 2 * I64 * Nw
    # start of backward: every saved tensor alive, plus the head's gradients
    # (and the sequence segment's output [V,B,H], which the heads read)
    fwd_saved = (seg_ids + scatter + a * N * H + heads) if ckpt else within + visit_level
    phases["forward"] = _phase(
        base, inputs, grads_before, fwd_saved, 3 * a * N * max(H, D)
    )  # fmt: skip
    # inside the within-visit LSTM's backward: its saved state, the dense gradient of its
    # output [n,L,E] (index backward), its input gradient [n,L,E], dh/dc [n,E] and the
    # gradient of the visit vectors [N,D]; every gradient but the embedding's is made. Groups
    # are run backward last first: at group k, groups 0..k are still saved and the input
    # gradients of the groups after k wait (fp32, the embedding output's dtype) for the split
    weight_new = FP32 * lstm_layer_param_count(E, E) if d.micro > 1 else 0
    within_grads = grads_all if d.micro > 1 else grads_no_emb
    worst = 0
    for k, (n, codes) in enumerate(groups):  # not `L`: that is the layer count
        waiting = sum(FP32 * m * M * E for m, M in groups[k + 1 :])
        # the output's gradient is 16-bit under autocast, the input's fp32 (the embedding's)
        live = sum(group_saved[: k + 1]) + waiting + (a + FP32) * n * codes * E + 2 * a * n * E
        worst = max(worst, live)
    # under autocast only the visit LSTM's 16-bit weights are still alive here: the other
    # copies were freed with the saved tensors of their backward (or, checkpointed, never kept)
    visit_copies = HALF * lstm_layer_param_count(E, E) if precision != "fp32" else 0
    phases["within_visit_backward"] = _phase(
        base, inputs, within_grads, ids, worst + a * Nw * D + weight_new + visit_copies,
        weight_copies=False,
    )  # fmt: skip
    # the end of the within-visit LSTM's forward (checkpointing: its recompute inside backward,
    # with the gradients of everything above it made): the fp32 embedding output ([T,E], all
    # groups) is alive beside the groups' saved state; under autocast the LSTM's time-major
    # copy of its group is fp32 before the 16-bit cast it keeps
    worst_fwd = 0
    for k, (n, codes) in enumerate(groups):
        upcast = FP32 * n * codes * E if a != FP32 else 0
        worst_fwd = max(worst_fwd, sum(group_saved[: k + 1]) + FP32 * T * E + upcast)
    phases["within_visit_lstm_forward"] = _phase(
        base,
        inputs,
        within_grads if ckpt else grads_before,
        ids + worst_fwd + (a * Nw * D + weight_new if ckpt else 0) + visit_copies,
        0,
        weight_copies=False,
    )
    if len(groups) > 1:
        # the split's backward: every group's input gradient and their concatenation [T,E]
        phases["within_visit_split_backward"] = _phase(
            base, inputs, within_grads, ids, 2 * FP32 * T * E
        )
    # the sequence LSTM's top layer's backward: the saved states of every layer with the
    # within-visit level still saved; the heads' and this layer's weight gradients are made;
    # temporaries: the gradient of its output, its input gradient and dh/dc
    top_in = H if L > 1 else D + 2
    top_grads = FP32 * (lstm_layer_param_count(top_in, H) + (H + 1) * (S + 1))
    seq_temps = a * N * H + a * N * top_in + 2 * a * B * H
    if d.micro > 1:  # the new weight gradients before they are added to the accumulated ones
        seq_temps += top_grads
    phases["sequence_backward"] = _phase(
        base,
        inputs,
        grads_all if d.micro > 1 else top_grads,
        (within if not ckpt else seg_ids + scatter) + drop_v + packed + seq,
        seq_temps,
    )
    # embedding backward: dense [vocab,E] gradient (in grads_all) while the gradient of the
    # embedding output ([N,C,E], or [T,E] over the groups) and the ids are alive; a frozen
    # table has no such step
    if not c.freeze_embeddings:
        phases["embedding_backward"] = _phase(
            base, inputs, grads_all, ids, FP32 * T * E, weight_copies=False
        )
    # Adam (single-tensor on CPU): sqrt and div temporaries of the largest parameter tensor
    phases["optimizer"] = _phase(
        base, inputs, grads_all, 0, 2 * FP32 * largest, weight_copies=False
    )
    return phases, saved


def _transformer_phases(
    c: EHRModelConfig, d: _Dims, ckpt: bool, device: str, precision: str
) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    E, D, F, L, S = c.code_embed_dim, c.visit_embed_dim, c.hidden_dim, c.num_layers, c.num_stages
    h = c.num_heads or 1
    N, B, V, C = d.N, d.B, d.V, d.C
    base, P, largest = _static(c, precision)
    P_emb = 0 if c.freeze_embeddings else c.vocab_size * E  # the table's share of P
    inputs = _inputs(d)
    grads_all = FP32 * P
    grads_before = grads_all if d.micro > 1 else 0
    p = c.dropout > 0
    a = FP32 if precision == "fp32" else HALF  # bytes of a matmul output under autocast
    T = FP32 * N * D  # one [B,V,D] fp32 tensor: the residual stream stays fp32 under autocast
    Ta = a * N * D  # one [B,V,D] matmul input/output (16-bit under autocast)
    FF = a * N * F  # one [B,V,d_ff] tensor
    A = a * B * h * V * V  # one attention matrix [B,h,V,V]

    # encode_visit: ids [N,C] int64 (embedding), ~mask [N,C] bool (masked_fill), counts [N]
    # int64 (div), pooled [N,E] (visit_projection input)
    ids = I64 * N * C + BOOL * N * C + 2 * I64 * N
    pooled = a * N * E
    # visit grid (visit vector + time projection + position): the dropout mask and output
    # (the first block's input); without dropout the sum itself is that input
    grid = 2 * T if p else T
    # one block: LN1 out, q, k, v (contiguous copies), attention output copy, LN2 out (as the
    # matmuls read them), the residual x1 and the block output (fp32); dropout masks after
    # attention and feed-forward; LN stats [B,V,1] x4 (fp32)
    block = 6 * Ta + 2 * T + (2 * Ta if p else 0) + 4 * FP32 * N
    # feed-forward: ff_in output (GELU input), GELU-dropout mask and output (ff_out input)
    block += FF + (2 * FF if p else FF)
    # attention: the math path keeps softmax output, dropout mask and output [B,h,V,V] (CPU
    # runs the math path whenever dropout is on, fused or not); fused without dropout (or on
    # CUDA) keeps the output and logsumexp only
    fused_no_matrix = c.use_flash_attention and (device == "cuda" or not p)
    if fused_no_matrix:
        block += Ta + FP32 * B * h * V
    else:
        block += 3 * A if p else A
    # heads: dropout mask (fp32), the input both linears read (fp32: shared; autocast: one
    # 16-bit copy each), logits and time [B,V,S+1], softplus input [B,V,1]
    final = (T if p else 0) + (T if a == FP32 else 2 * Ta) + a * N * (S + 2)
    saved = {
        "encoder.code_embeddings+indices": ids,
        "encoder.visit_projection": pooled,
        "encoder.grid": grid,
        "encoder.layers": L * block,
        "encoder.final_norm+heads": final,
    }
    phases: dict[str, dict[str, int]] = {}
    # forward transient: the embedding output [N,C,E] and its masked copy are both alive
    # (before any matmul ran, so no autocast weight copy exists yet)
    phases["embedding_forward"] = _phase(
        base, inputs, grads_before, ids, 2 * FP32 * N * C * E, weight_copies=False
    )
    # start of backward: everything saved; checkpointing keeps only each block's input (the
    # grid's output for the first, counted in grid) and the last block's output (final LN input)
    kept = ids + grid + (L * T if ckpt else L * block) + final + (0 if ckpt else pooled)
    # under autocast the forward ends (loss computed) before autocast's cache of 16-bit weight
    # copies is dropped, so the copies of checkpointed blocks are alive at that moment too
    # temporaries: three [B,V,D] gradients at the heads, or early in the top block's backward
    # the gradient of its feed-forward hidden [B,V,d_ff] (larger when d_ff > 3 d_model)
    phases["forward"] = _phase(base, inputs, grads_before, kept, max(3 * Ta, FF))
    if ckpt:
        # block k recomputed inside backward (top block first): its saved tensors on top of the
        # inputs of blocks 1..k (block 0's is the grid's output); the gradients of the heads,
        # the final LN and the blocks above k are made (from micro-batch 2 on: all of them);
        # the recompute casts the block's weights to 16 bits again (its own autocast cache);
        # the gradient of its output and of the feed-forward are the temporaries
        block_p = transformer_block_param_count(D, F)
        block_copies = HALF * (block_p - 4 * D) if precision != "fp32" else 0  # no LN params
        heads_p = layer_norm_param_count(D) + (D + 1) * (S + 1)
        worst = 0
        for k in range(L - 1, -1, -1):
            made = grads_before or FP32 * (heads_p + (L - 1 - k) * block_p)
            worst = max(worst, made + k * T + block + block_copies)
        phases["layer_backward"] = _phase(
            base, inputs, 0, ids + grid + worst, 2 * Ta + FF, weight_copies=False
        )
        # the checkpointed visit encoder recomputed last in backward: every gradient but the
        # table's and the visit projection's is made; the [N,C,E] embedding output and its
        # masked copy are alive again
        phases["embedding_recompute"] = _phase(
            base,
            inputs,
            grads_before or FP32 * (P - P_emb - (E + 1) * D),
            ids + Ta,
            2 * FP32 * N * C * E,
            weight_copies=False,
        )
    # embedding backward: dense [vocab,E] gradient while the [N,C,E] gradient of the masked
    # embedding output is alive; a frozen table has no such step
    if not c.freeze_embeddings:
        phases["embedding_backward"] = _phase(
            base, inputs, grads_all, ids, FP32 * N * C * E, weight_copies=False
        )
    phases["optimizer"] = _phase(
        base, inputs, grads_all, 0, 2 * FP32 * largest, weight_copies=False
    )
    return phases, saved


def estimate_memory(
    config: EHRModelConfig,
    *,
    precision: str = "fp32",
    device: str = "cpu",
    batch_size: int | None = None,
    checkpointing: bool | None = None,
    visits: int | None = None,
    codes: int | None = None,
    lstm_kernel: str = "mkldnn",
    visit_groups: Sequence[tuple[int, int]] | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory of one training step of ``config`` on ``device``.

    ``visits``/``codes`` give the padded batch shape (default: ``max_visits`` x
    ``max_codes_per_visit``, full padding). ``lstm_kernel`` is the CPU LSTM kernel: ``mkldnn``
    (oneDNN, torch's default) or ``native``. ``visit_groups`` (LSTM, data-shaped batches): the
    ``(visits, codes)`` of each length group the within-visit encoder runs, from
    `ehrplan.plan.grouping.group_shapes` of the batch's real visits; by default every one of the
    ``batch x visits`` visits is real and has ``codes`` codes (one group).
    """
    B = batch_size if batch_size is not None else config.batch_size
    ckpt = config.use_checkpoint if checkpointing is None else checkpointing
    d = _Dims(
        B=B,
        V=visits or config.max_visits,
        C=codes or config.max_codes_per_visit,
        micro=min(config.gradient_accumulation_steps, 2),
        groups=[(int(n), int(L)) for n, L in visit_groups] if visit_groups else None,
    )
    kernel = lstm_kernel if device == "cpu" else "native"
    if config.model_type == "lstm":
        phases, saved = _lstm_phases(config, d, ckpt, kernel, precision)
    else:
        phases, saved = _transformer_phases(config, d, ckpt, device, precision)
    peak_phase = max(phases, key=lambda k: sum(phases[k].values()))
    notes: list[str] = []
    overhead: dict[str, int] = {}
    if device == "cuda":
        total = sum(phases[peak_phase].values())
        overhead = {
            "cuda_context": CUDA_CONTEXT_BYTES,
            "allocator_reserve": int(total * (CUDA_RESERVED_FACTOR - 1)),
        }
        notes.append(
            "CUDA path unmeasured: cuDNN LSTM state is modelled like the native kernel; "
            "context and allocator reserve are assumptions"
        )
    if device == "mps":
        notes.append("MPS path unmeasured: MPS has no peak counter; the dry run samples it")
    if precision == "fp16" and device == "cpu":
        notes.append("fp16 on the CPU is modelled like bf16 and unmeasured")
    return MemoryEstimate(
        precision=precision,
        device=device,
        batch_size=B,
        checkpointing=ckpt,
        breakdown=phases[peak_phase],
        notes=notes,
        peak_phase=peak_phase,
        phases={k: sum(v.values()) for k, v in phases.items()},
        saved_by_module=saved,
        device_overhead=overhead,
        lstm_gate_bytes=_lstm_gate_bytes(config, d),
    )


def _lstm_gate_bytes(c: EHRModelConfig, d: _Dims) -> int:
    """fp32 gate bytes of the largest LSTM call: a within-visit group or the sequence LSTM."""
    if c.model_type != "lstm":
        return 0
    within = max(n * codes for n, codes in (d.groups or [(d.N, d.C)])) * 4 * c.code_embed_dim
    return FP32 * max(within, d.N * 4 * c.hidden_dim)
