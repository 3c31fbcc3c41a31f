"""Per-GPU peak memory and step time of data-parallel training (DDP, FSDP2), analytically.

No torch: this composes `ehrplan.plan.estimator.estimate_memory` (one device, one micro-batch) with
what `ehrplan.runtime.distributed.wrap_model` adds or removes on every rank.

The estimator models a step as phases (moments where the live set can peak). Asked for a step
that accumulates (``gradient_accumulation_steps >= 2``), every phase it returns holds a full set
of fp32 gradients, so with P parameters each phase total is

    phase = D + 4P (parameters) + 8P (Adam's exp_avg, exp_avg_sq) + 4P (gradients)

where D, the *dynamic* part, is the batch, the tensors saved for backward, the temporaries and
(mixed precision) autocast's weight copies. D does not depend on the strategy; the static part
does, and is replaced below.

DDP (``DistributedDataParallel(gradient_as_bucket_view=True)``): every rank holds the whole model,
its Adam state and its gradients. DDP copies gradients into flat *buckets* (25 MiB each) and
all-reduces the buckets in place; those buckets are its communication buffers. With
``gradient_as_bucket_view=True`` each ``param.grad`` *is* a view into its bucket, so the buckets
and the gradients are the same bytes, counted once (without it they are two copies: 8P, not 4P).
The buckets are allocated when the model is wrapped, so they are live in every phase, the
forward of the first micro-batch included, which is the estimator's accumulating step. On top:
autograd hands the hook each parameter's incoming gradient as a new tensor before it is added
into the bucket view; the largest is the dense gradient of the code embedding table.

FSDP2 (``fully_shard`` on each embedding table, LSTM and Transformer block, then the root):
parameters, gradients and Adam state are split over the W ranks (``/W``). A unit's parameters are
all-gathered (unsharded) while it runs and freed after (the root's stay unsharded from the start of
forward to the end of backward). In backward FSDP2 prefetches the next unit while the current one
runs, so two units are unsharded at once; when a unit's backward ends its unsharded gradients are
copied into a flat reduce-scatter input, then reduce-scattered into a ``1/W`` output that becomes
the sharded gradients. gloo has no native reduce-scatter: on the CPU the input is copied once more
(measured on torch 2.13, ``benchmarks/distributed_memory.py``); NCCL works in place.

Dim-0 padding of each tensor to a multiple of W (at most W - 1 rows per tensor) is left out.

The time estimate divides the FLOPs of a rank's share of an optimizer step (`ehrplan.plan.flops`, at
full padding) by the device's dense peak throughput from the hardware catalog times an assumed
utilisation (``DEFAULT_UTILISATION``). Communication is assumed to overlap with compute and is
not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ehrplan.errors import UsageError
from ehrplan.plan.config import EHRModelConfig
from ehrplan.plan.estimator import (
    CUDA_RESERVED_FACTOR,
    estimate_memory,
    largest_updated_tensor,
    static_memory,
)
from ehrplan.plan.flops import training_step_flops
from ehrplan.plan.params import count_parameters, lstm_layer, transformer_block

Strategy = Literal["ddp", "fsdp"]
STRATEGIES: tuple[str, ...] = ("ddp", "fsdp")


def split_batch(effective_batch: int, micro_batch: int, world_size: int) -> tuple[int, int]:
    """Per-rank micro-batch and accumulation steps with
    ``micro x accumulation x world_size == effective_batch``.

    Keeps the config's micro-batch where it divides evenly, else the largest micro-batch no
    bigger than it that does; refuses an effective batch the ranks cannot share evenly.
    """
    if effective_batch % world_size:
        raise UsageError(
            f"the effective batch {effective_batch} cannot be split evenly over "
            f"{world_size} processes"
        )
    per_rank = effective_batch // world_size
    micro = min(micro_batch, per_rank)
    while per_rank % micro:
        micro -= 1
    return micro, per_rank // micro


def check_strategy_name(strategy: str) -> None:
    """Refuse a strategy that is neither DDP nor FSDP, naming the valid ones."""
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy '{strategy}' (valid: {', '.join(STRATEGIES)})")


def check_strategy(strategy: str, world_size: int) -> None:
    """Refuse unknown strategies, and FSDP on one process (sharding over one rank is DDP-less
    single-device training with extra all-gathers)."""
    check_strategy_name(strategy)
    if strategy == "fsdp" and world_size < 2:
        raise UsageError(
            "--shard (FSDP) needs at least 2 processes: add --nproc N, or run under torchrun"
        )


FP32 = 4  # bytes per fp32 element (parameters, gradients, Adam state are fp32 in every precision)
BACKENDS: tuple[str, ...] = ("nccl", "gloo")

#: Fraction of the catalog's dense peak throughput a training step is assumed to reach. An
#: ASSUMPTION, not a measurement: small recurrent models reach far less (see the CPU check in
#: ``benchmarks/distributed_memory.py --time``); override with ``--utilisation``.
DEFAULT_UTILISATION = 0.3


@dataclass(frozen=True)
class ParallelEstimate:
    """Peak training-step memory on each device of a data-parallel job."""

    strategy: str  # "single", "ddp" or "fsdp"
    world_size: int
    backend: str
    micro_batch: int
    accumulation: int
    effective_batch: int
    precision: str
    device: str
    peak_moment: str
    """Which moment of the step the per-device peak is at."""
    breakdown: dict[str, int] = field(default_factory=dict)
    """Live bytes on one device at the peak, by what holds them."""
    moments: dict[str, int] = field(default_factory=dict)
    """Total live bytes on one device at every modelled moment."""
    units: dict[str, int] = field(default_factory=dict)
    """FSDP: parameters of each sharded unit (the root holds what no unit does)."""
    device_overhead: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def per_device_bytes(self) -> int:
        return sum(self.breakdown.values())

    @property
    def job_bytes(self) -> int:
        """Every device of the job together (per device x world size)."""
        return self.per_device_bytes * self.world_size

    def as_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "world_size": self.world_size,
            "backend": self.backend,
            "micro_batch": self.micro_batch,
            "accumulation": self.accumulation,
            "effective_batch": self.effective_batch,
            "precision": self.precision,
            "device": self.device,
            "per_device_bytes": self.per_device_bytes,
            "job_bytes": self.job_bytes,
            "peak_moment": self.peak_moment,
            "breakdown": dict(self.breakdown),
            "moments": dict(self.moments),
            "units": dict(self.units),
            "device_overhead": dict(self.device_overhead),
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------------------------
# what FSDP shards, and the largest single tensor


def shard_units(config: EHRModelConfig) -> dict[str, int]:
    """Parameters of each unit `ehrplan.runtime.distributed.shard_blocks` shards, and of the root.

    LSTM: the code embedding table, the within-visit LSTM, the sequence LSTM (one ``nn.LSTM``,
    all layers); the root keeps the visit projection and the heads. Transformer: the code and the
    position embedding tables and each block; the root keeps the visit and time projections, the
    final LayerNorm and the heads.
    """
    p = count_parameters(config).modules
    E, D, H, L = config.code_embed_dim, config.visit_embed_dim, config.hidden_dim, config.num_layers
    units: dict[str, int] = {"encoder.code_embeddings": p["encoder.code_embeddings"]}
    if config.model_type == "lstm":
        units["encoder.visit_lstm"] = lstm_layer(E, E)  # hidden = E within a visit
        units["encoder.sequence_lstm"] = p["encoder.sequence_lstm"]
    else:
        units["encoder.position_embeddings"] = config.max_visits * D  # [max_visits, D]
        for i in range(L):
            units[f"encoder.layers.{i}"] = transformer_block(D, H)
    units["root"] = sum(p.values()) - sum(units.values())
    return units


# ---------------------------------------------------------------------------------------------
# memory


def _two_largest(units: dict[str, int]) -> tuple[int, int, int, int]:
    """Unknown phase: the two largest units unsharded, the largest one's gradient made, every
    unit's sharded gradient made and the largest one's reduce-scatter input held (an upper
    bound)."""
    blocks = sorted((v for k, v in units.items() if k != "root"), reverse=True)
    return sum(blocks[:2]), blocks[0], sum(blocks), blocks[0]


def _units_in_flight(
    config: EHRModelConfig, units: dict[str, int]
) -> dict[str, tuple[int, int, int, int]]:
    """For each estimator phase, parameters of: the non-root units unsharded then (the unit that
    runs and the one FSDP2 prefetches next: in forward the next unit, in backward the previous
    one); the unit whose unsharded gradients are being made; the units whose backward is done
    (reduce-scattered: their sharded gradients exist even in the first micro-batch); the unit
    reduce-scattered last, whose flat reduce-scatter input FSDP2 holds until the next unit's
    reduce-scatter (measured: ``benchmarks/distributed_memory.py``)."""
    emb = units["encoder.code_embeddings"]
    emb_grad = 0 if config.freeze_embeddings else emb  # a frozen table makes no gradient
    if config.model_type == "lstm":
        visit, seq = units["encoder.visit_lstm"], units["encoder.sequence_lstm"]
        return {
            "within_visit_forward": (emb + visit, 0, 0, 0),  # the visit LSTM runs after the table
            "forward": (seq + visit, 0, 0, 0),  # start of backward: sequence LSTM, visit LSTM next
            "sequence_backward": (seq + visit, seq, 0, 0),
            "within_visit_backward": (visit + emb, visit, seq, seq),  # the table is prefetched
            "embedding_backward": (emb, emb_grad, seq + visit, visit),  # the last unit
        }
    pos = units["encoder.position_embeddings"]
    L = config.num_layers
    blocks = [units[f"encoder.layers.{i}"] for i in range(L)]
    below = blocks[-2] if L > 1 else pos
    return {
        "embedding_forward": (emb + pos, 0, 0, 0),  # code embeddings run, position table next
        "forward": (blocks[-1] + below, 0, 0, 0),  # start of backward: the top block, then below
        "layer_backward": (blocks[-1] + below, blocks[-1], 0, 0),
        "embedding_backward": (emb, emb_grad, sum(blocks) + pos, pos),
    }


def _dynamic_phases(
    config: EHRModelConfig,
    micro: int,
    precision: str,
    device: str,
    checkpointing: bool | None,
    lstm_kernel: str,
    visits: int | None = None,
    codes: int | None = None,
    visit_groups: list[tuple[int, int]] | None = None,
) -> tuple[dict[str, int], bool, list[str], dict[str, int], int]:
    """D of every phase at micro-batch ``micro``: the estimator's accumulating step (full fp32
    gradients in every phase) less its 16 bytes per parameter of static state."""
    acc = config.model_copy(update={"gradient_accumulation_steps": 2, "batch_size": micro})
    est = estimate_memory(
        acc,
        precision=precision,
        device=device,
        batch_size=micro,
        checkpointing=checkpointing,
        lstm_kernel=lstm_kernel,
        visits=visits,
        codes=codes,
        visit_groups=visit_groups,
    )
    # what the estimator holds in every phase of an accumulating step: parameters, the
    # gradients and Adam's exp_avg, exp_avg_sq (16 bytes per trainable parameter in fp32)
    sm = static_memory(acc, precision)
    static = sm["parameters"] + sm["gradients"] + sm["optimizer_state"]
    dyn = {k: v - static for k, v in est.phases.items()}
    return dyn, list(est.notes), dict(est.device_overhead), est.total_bytes


def estimate_parallel(
    config: EHRModelConfig,
    *,
    world_size: int,
    strategy: str = "ddp",
    precision: str = "fp32",
    device: str = "cuda",
    backend: str | None = None,
    checkpointing: bool | None = None,
    lstm_kernel: str = "mkldnn",
    micro_batch: int | None = None,
    accumulation: int | None = None,
    visits: int | None = None,
    codes: int | None = None,
    visit_groups: list[tuple[int, int]] | None = None,
) -> ParallelEstimate:
    """Per-device peak training-step memory of ``config`` data-parallel over ``world_size``
    devices. The effective batch is kept: each rank runs micro-batch x accumulation with
    ``micro x accumulation x world_size = config.effective_batch_size`` (`split_batch`).

    ``backend``: ``nccl`` (default on CUDA) or ``gloo`` (default elsewhere). ``micro_batch`` and
    ``accumulation`` replace that split (the planner grows the effective batch where it cannot be
    split evenly, and says so). ``visits``/``codes``: the padded batch shape (default: the
    config's maxima, full padding); ``visit_groups``: its within-visit length groups (see
    `ehrplan.plan.estimator.estimate_memory`).
    """
    check_strategy_name(strategy)
    if world_size < 1:
        raise UsageError(f"--gpus must be at least 1, not {world_size}")
    if strategy == "fsdp" and world_size > 1:
        visit_groups = None  # FSDP runs the within-visit LSTM ungrouped (the trainer's rule)
    backend = backend or ("nccl" if device == "cuda" else "gloo")
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend '{backend}' (valid: {', '.join(BACKENDS)})")
    if micro_batch is not None and accumulation is not None:
        micro, accum = micro_batch, accumulation
    else:
        micro, accum = split_batch(config.effective_batch_size, config.batch_size, world_size)
    W = world_size
    counts = count_parameters(config)
    P, T = counts.total, counts.trainable  # T: parameters with gradients and Adam state
    common: dict[str, Any] = {
        "world_size": W,
        "backend": backend,
        "micro_batch": micro,
        "accumulation": accum,
        "effective_batch": micro * accum * W,
        "precision": precision,
        "device": device,
    }
    if W == 1:  # one process: the estimator's own answer, nothing wrapped
        one = config.model_copy(update={"batch_size": micro, "gradient_accumulation_steps": accum})
        est = estimate_memory(
            one, precision=precision, device=device, checkpointing=checkpointing,
            lstm_kernel=lstm_kernel, visits=visits, codes=codes, visit_groups=visit_groups,
        )  # fmt: skip
        if strategy == "fsdp":
            raise UsageError("FSDP needs a world size of at least 2 (--gpus 2 or more)")
        return ParallelEstimate(
            strategy="single",
            peak_moment=est.peak_phase,
            breakdown=dict(est.breakdown),
            moments=dict(est.phases),
            device_overhead=dict(est.device_overhead),
            notes=list(est.notes),
            **common,
        )

    dyn, notes, overhead, _ = _dynamic_phases(
        config, micro, precision, device, checkpointing, lstm_kernel, visits, codes, visit_groups
    )
    # code slots of a micro-batch (through the within-visit encoder, when grouped)
    N_C = (
        sum(n * L for n, L in visit_groups)
        if visit_groups
        else micro * (visits or config.max_visits) * (codes or config.max_codes_per_visit)
    )
    emb = config.vocab_size * config.code_embed_dim  # code embedding table [vocab, E]
    trainable_emb = 0 if config.freeze_embeddings else emb
    biggest = largest_updated_tensor(config)

    moments: dict[str, dict[str, int]] = {}
    if strategy == "ddp":
        static = {
            "parameters": FP32 * P,  # the full replica on every rank
            "optimizer_state": 2 * FP32 * T,  # Adam's exp_avg and exp_avg_sq, fp32
            "gradient_buckets": FP32 * T,  # DDP's flat buckets; param.grad are views into them
        }
        for k, d in dyn.items():
            moments[k] = {**static, "batch_activations_temporaries": d}
        if "embedding_backward" in moments:
            # the dense gradient of the embedding table [vocab, E], made by its backward, lives
            # beside its bucket view until the hook adds it in
            moments["embedding_backward"]["incoming_gradient"] = FP32 * trainable_emb
    else:
        units = shard_units(config)
        root = units["root"]
        in_flight = _units_in_flight(config, units)
        sharded = {
            "parameters_sharded": FP32 * P // W,  # each rank's 1/W of every parameter
            "optimizer_state_sharded": 2 * FP32 * T // W,  # Adam state of its shard only
            "gradients_sharded": FP32 * T // W,  # reduce-scatter outputs, 1/W of each gradient
        }
        for k, d in dyn.items():
            if k == "optimizer":
                continue
            running, grads_of, done, held = in_flight.get(k, _two_largest(units))
            m = {
                **sharded,
                "batch_activations_temporaries": d,
                "unsharded_root": FP32 * root,  # the root stays all-gathered through the step
                "unsharded_units": FP32 * running,  # the unit running + the one prefetched
                "unsharded_gradients": FP32 * grads_of,  # of the unit whose backward runs
                "reduce_scatter_input_held": FP32 * held,  # of the unit reduced last
            }
            if accum == 1:
                # one micro-batch: sharded gradients exist for the units already reduced
                m["gradients_sharded"] = FP32 * done // W
            moments[k] = m
        # reduce-scatter of the code embedding table, the last unit of backward: its unsharded
        # gradient [vocab, E] and the flat reduce-scatter input it is copied into (gloo: and the
        # copy gloo all-reduces); the 1/W output is the table's sharded gradient (in
        # gradients_sharded), a separate buffer only when a later micro-batch adds into an
        # existing one. The embedding output's gradient [N, C, E] is already freed; the batch and
        # the ids are not
        if "embedding_backward" in dyn:
            d = dyn["embedding_backward"] - FP32 * N_C * config.code_embed_dim
            copies = 3 if backend == "gloo" else 2
            moments["embedding_reduce_scatter"] = {
                **sharded,
                # every unit but the root is reduced (the table's output is its shard)
                "gradients_sharded": FP32 * (T if accum > 1 else T - root) // W,
                "batch_activations_temporaries": d,
                "unsharded_root": FP32 * root,
                "unsharded_gradient_and_reduce_scatter_buffers": copies * FP32 * trainable_emb,
            }
            if accum > 1:
                moments["embedding_reduce_scatter"]["reduce_scatter_output"] = (
                    FP32 * trainable_emb // W
                )
        # Adam on the shard: the batch is still referenced; sqrt and div temporaries are the size
        # of the largest local shard, not the largest tensor
        d_opt = dyn["optimizer"] - 2 * FP32 * biggest
        moments["optimizer"] = {
            **sharded,
            "batch_activations_temporaries": d_opt + 2 * FP32 * (-(-biggest // W)),
        }
        notes = [*notes, "FSDP: dim-0 padding of each shard (< W rows per tensor) left out"]
    peak = max(moments, key=lambda k: sum(moments[k].values()))
    if device == "cuda" and overhead:
        # the caching allocator's reserve scales with what is allocated on this device
        overhead = {
            **overhead,
            "allocator_reserve": int(sum(moments[peak].values()) * (CUDA_RESERVED_FACTOR - 1)),
        }
    if backend == "nccl":
        notes.append(
            "NCCL's own communication buffers (outside PyTorch's allocator) are not modelled"
        )
    return ParallelEstimate(
        strategy=strategy,
        peak_moment=peak,
        breakdown=moments[peak],
        moments={k: sum(v.values()) for k, v in moments.items()},
        units=shard_units(config) if strategy == "fsdp" else {},
        device_overhead=overhead,
        notes=notes,
        **common,
    )


# ---------------------------------------------------------------------------------------------
# time


@dataclass(frozen=True)
class TimeEstimate:
    """Seconds per optimizer step and per epoch from FLOPs and an assumed utilisation."""

    flops_per_step_per_device: int
    peak_tflops: float
    utilisation: float
    seconds_per_step: float
    steps_per_epoch: int | None
    seconds_per_epoch: float | None
    patients: int | None
    throughput_source: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "flops_per_step_per_device": self.flops_per_step_per_device,
            "peak_tflops": self.peak_tflops,
            "utilisation": self.utilisation,
            "seconds_per_step": self.seconds_per_step,
            "steps_per_epoch": self.steps_per_epoch,
            "seconds_per_epoch": self.seconds_per_epoch,
            "patients": self.patients,
            "throughput_source": self.throughput_source,
            "assumptions": "full padding (an upper bound on work); dense peak x utilisation; "
            "communication overlapped with compute",
        }


def check_utilisation(utilisation: float) -> None:
    if not 0.0 < utilisation <= 1.0:
        raise UsageError(f"--utilisation must be in (0, 1], not {utilisation}")


def estimate_time(
    config: EHRModelConfig,
    *,
    peak_tflops: float,
    world_size: int = 1,
    utilisation: float = DEFAULT_UTILISATION,
    patients: int | None = None,
    checkpointing: bool | None = None,
    throughput_source: str = "",
    micro_batch: int | None = None,
    accumulation: int | None = None,
) -> TimeEstimate:
    """Seconds per optimizer step (every rank works in parallel on ``effective / W`` patients)
    and per epoch of ``patients`` training patients (``micro_batch``/``accumulation``: a rank's
    share, when not `split_batch`'s)."""
    check_utilisation(utilisation)
    if peak_tflops <= 0:
        raise UsageError(f"peak throughput must be positive, not {peak_tflops} TFLOPS")
    if micro_batch is not None and accumulation is not None:
        micro, accum = micro_batch, accumulation
    else:
        micro, accum = split_batch(config.effective_batch_size, config.batch_size, world_size)
    rank = config.model_copy(update={"batch_size": micro, "gradient_accumulation_steps": accum})
    # a rank's share of one optimizer step: accum micro-batches of `micro` patients
    flops = training_step_flops(rank, checkpointing=checkpointing).per_optimizer_step
    seconds = flops / (peak_tflops * 1e12 * utilisation)  # FLOPs / sustained FLOP/s
    steps = -(-patients // (micro * accum * world_size)) if patients else None
    return TimeEstimate(
        flops_per_step_per_device=flops,
        peak_tflops=peak_tflops,
        utilisation=utilisation,
        seconds_per_step=seconds,
        steps_per_epoch=steps,
        seconds_per_epoch=seconds * steps if steps else None,
        patients=patients,
        throughput_source=throughput_source,
    )


def catalog_tflops(row: Any, precision: str) -> tuple[float, str]:
    """The catalog row's dense peak for ``precision`` (16-bit: tensor-core peak where listed)."""
    if precision != "fp32" and row.half_tflops is not None:
        return float(row.half_tflops), f"{row.label}: dense fp16/bf16 peak (catalog)"
    if row.fp32_tflops is None:
        raise UsageError(f"the catalog lists no throughput for {row.label}: give --tflops")
    return float(row.fp32_tflops), f"{row.label}: dense fp32 peak (catalog)"
