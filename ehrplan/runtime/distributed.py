"""Running under `torchrun`: the process group, the batch split, and model wrapping.

ehrplan does not launch processes itself: PyTorch's ``torchrun`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT``, and `DistEnv.from_environ` reads them. The
backend is NCCL on CUDA and gloo on the CPU.

Strategies:

- ``ddp`` (default): every rank holds the whole model, its gradients and optimizer state; DDP
  all-reduces gradients in buckets. Resuming with a different world size is allowed: the
  checkpoint holds one unsharded copy, and the effective batch is split anew.
- ``fsdp`` (FSDP2, ``fully_shard``): parameters, gradients and optimizer state are sharded over
  the ranks; each block (an LSTM, a Transformer block, the embedding table) is all-gathered when
  it runs. Resuming needs the same world size (the optimizer state is saved per shard).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ehrplan.errors import UsageError

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> DistEnv:
        env = os.environ if environ is None else environ
        try:
            return cls(
                rank=int(env.get("RANK", 0)),
                world_size=int(env.get("WORLD_SIZE", 1)),
                local_rank=int(env.get("LOCAL_RANK", 0)),
            )
        except ValueError as err:
            raise UsageError(f"malformed torchrun environment: {err}") from None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) logs and writes files."""
        return self.rank == 0


def shard_blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP shards one by one: each embedding table, each LSTM, each Transformer
    block. The root module is sharded last and holds what is left (projections, heads)."""
    from torch import nn

    from ehrplan.runtime.models.transformer import TransformerBlock

    units = (nn.Embedding, nn.LSTM, TransformerBlock)
    return [m for m in model.modules() if m is not model and isinstance(m, units)]


def init_process_group(env: DistEnv, device_type: str) -> None:
    """Join the job's process group (NCCL on CUDA, gloo otherwise)."""
    import torch.distributed as dist

    if env.is_distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def wrap_model(model: nn.Module, strategy: str, env: DistEnv, device_type: str) -> nn.Module:
    """DDP or FSDP2 around ``model`` (already on its device); unchanged on one process."""
    if not env.is_distributed:
        return model
    if strategy == "fsdp":
        import warnings

        from torch.distributed.fsdp import fully_shard

        # nn.LSTM and the heads return views; nothing of ours changes a unit's output in place
        # (the single-process comparison in tests/test_torchrun.py would catch a lost gradient)
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view")

        for m in model.modules():  # one within-visit LSTM call per micro-batch (see there)
            if hasattr(m, "length_groups"):
                m.length_groups = False
        for block in shard_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [env.local_rank] if device_type == "cuda" else None
    # gradient_as_bucket_view: gradients live in DDP's buckets, not in a second copy
    return DDP(model, device_ids=device_ids, gradient_as_bucket_view=True)


def torchrun_argv(nproc: int, args: Sequence[str]) -> list[str]:
    """The command that runs ``ehrplan ARGS`` on ``nproc`` processes of this node."""
    if nproc < 1:
        raise UsageError(f"--nproc must be at least 1, not {nproc}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "ehrplan",
        *args,
    ]


def describe(argv: Sequence[str]) -> str:
    return shlex.join(argv)


# ---------------------------------------------------------------------------------------------
# one optimizer step, shared out (no torch)


def rank_share(
    group: Sequence[Sequence[int]], micro: int, accumulation: int, env: DistEnv
) -> tuple[list[list[int]], int]:
    """This rank's micro-batches of one optimizer step, and how many non-empty micro-batches
    the whole job runs for it.

    ``group`` is the step's micro-batches in the single-process order (the trainer's seeded,
    length-bucketed batches of the config's micro-batch). The job runs
    ``world_size x accumulation`` micro-batches of at most ``micro`` patients: each of the
    group's micro-batches is cut into pieces of ``micro`` (when ``micro`` divides the config's
    micro-batch, the pieces are the single process's micro-batches themselves, so the loss and
    the gradient are the single process's), else the step's patients are cut in order. Rank r
    takes pieces ``r x accumulation ... (r + 1) x accumulation - 1``; a rank may get an empty
    piece at the end of an epoch (it then runs a zero-weighted micro-batch so that the
    collectives still match). Every micro-batch's loss is weighted ``world_size / n`` (n: the
    non-empty pieces of the job), so that DDP's and FSDP's average over the ranks gives the
    single process's mean over micro-batches.
    """
    if not env.is_distributed:
        return [list(b) for b in group], len(group)
    slots = env.world_size * accumulation
    pieces: list[list[int]] = []
    if all(len(b) <= micro or len(b) % micro == 0 for b in group[:-1]):
        for b in group:
            pieces += [list(b[i : i + micro]) for i in range(0, len(b), micro)]
    if not pieces or len(pieces) > slots:
        flat = [i for b in group for i in b]
        pieces = [flat[i : i + micro] for i in range(0, len(flat), micro)]
    if len(pieces) > slots:
        raise UsageError(
            f"internal: {len(pieces)} micro-batches of {micro} for {slots} slots of the step"
        )
    n = len(pieces)
    pieces += [[] for _ in range(slots - n)]
    mine = pieces[env.rank * accumulation : (env.rank + 1) * accumulation]
    return mine, n


def check_resume(saved: dict[str, object] | None, strategy: str, env: DistEnv) -> str | None:
    """Whether a checkpoint written by a job of ``saved`` (strategy, world size) can be resumed
    by this one; a warning to print, or None. Refused: FSDP runs on another number of processes
    or without FSDP (their optimizer state is saved per shard), and non-FSDP runs with FSDP."""
    was = str((saved or {}).get("strategy", "single"))
    was_world = int((saved or {}).get("world_size", 1))  # type: ignore[call-overload]
    now = strategy if env.is_distributed else "single"
    if was == "fsdp" and (now != "fsdp" or was_world != env.world_size):
        raise UsageError(
            f"cannot resume: the run was trained with --shard (FSDP) on {was_world} processes "
            f"and its optimizer state is saved per shard; resume it with --shard on "
            f"{was_world} processes"
        )
    if now == "fsdp" and was != "fsdp":
        raise UsageError(
            "cannot resume with --shard: the run was trained without FSDP; resume it without "
            "--shard (any number of processes)"
        )
    if was_world != env.world_size:
        return (
            f"resuming a run of {was_world} process(es) on {env.world_size}: the effective "
            "batch is kept, but the batch split and random streams differ, so the continuation "
            "is not bit-identical to an uninterrupted run"
        )
    return None


# ---------------------------------------------------------------------------------------------
# the running job (these import torch)


def setup(env: DistEnv, device_type: str) -> str:
    """Join the process group; on CUDA pin this rank to GPU ``LOCAL_RANK``. Returns the device
    string this rank trains on (``cuda:LOCAL_RANK`` or the device type)."""
    if not env.is_distributed:
        return device_type
    if device_type == "cuda":
        import torch

        torch.cuda.set_device(env.local_rank)
    init_process_group(env, device_type)
    return f"cuda:{env.local_rank}" if device_type == "cuda" else device_type


def barrier(env: DistEnv) -> None:
    if env.is_distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


def teardown(env: DistEnv) -> None:
    """Every rank waits for the others, then leaves the process group."""
    if env.is_distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (FSDP2 shards in place: the module itself)."""
    return getattr(model, "module", model)


def all_reduce_sum(values: Sequence[float], env: DistEnv) -> list[float]:
    """Sum numbers over the ranks (in float64)."""
    if not env.is_distributed:
        return list(values)
    import torch
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def average_gradients(params: Sequence[object], env: DistEnv) -> None:
    """Average the gradients of parameters no wrapper syncs (the loss's own scale parameter)."""
    if not env.is_distributed:
        return
    import torch
    import torch.distributed as dist

    for p in params:
        assert isinstance(p, torch.Tensor)
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(env.world_size)


def clip_grad_norm(model_params: Sequence[object], other_params: Sequence[object], max_norm: float):  # type: ignore[no-untyped-def]
    """``clip_grad_norm_`` over sharded (DTensor) and plain parameters together: the norm of
    each kind separately (a sharded norm is reduced over the ranks), then one coefficient."""
    import torch
    from torch.distributed.tensor import DTensor
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    norms = []
    for params in (model_params, other_params):
        grads = [p.grad for p in params if p.grad is not None]  # type: ignore[attr-defined]
        if grads:
            n = get_total_norm(grads)
            norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    for params in (model_params, other_params):
        if params:
            clip_grads_with_norm_(params, max_norm, total)  # type: ignore[arg-type]
    return total


def _reshard(model: nn.Module) -> None:
    """FSDP2 keeps the root unit all-gathered after a forward without backward (evaluation);
    (re)storing state needs every unit sharded."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@contextmanager
def gathered(model: nn.Module, strategy: str, env: DistEnv) -> Iterator[None]:
    """Under FSDP: every unit all-gathered once, in the module order (the same collectives on
    every rank), and kept whole through the forward passes inside the block, which then make
    no collective, so ranks may run different batches and different numbers of them (sharded
    evaluation); resharded on the way out. Costs the whole model's parameters on every rank for
    that while (evaluation keeps no gradients or optimizer state). Else nothing."""
    if not (env.is_distributed and strategy == "fsdp"):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    inner = [m for m in units if m is not model]  # the root stays as fully_shard set it
    for m in inner:
        m.set_reshard_after_forward(False, recurse=False)
    for m in units:
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
        for m in inner:  # fully_shard's default for a unit that is not the root
            m.set_reshard_after_forward(True, recurse=False)


def model_state(model: nn.Module, strategy: str, env: DistEnv) -> dict[str, object]:
    """The whole model's state dict, unsharded, on CPU (FSDP: gathered, a collective; only rank
    0 gets it, the others an empty dict). Keys are those of the plain model."""
    if env.is_distributed and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        _reshard(model)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return dict(get_model_state_dict(model, options=opts))
    return unwrap(model).state_dict()


def load_model_state(
    model: nn.Module, state: dict[str, object], strategy: str, env: DistEnv
) -> None:
    if env.is_distributed and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        _reshard(model)
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))  # type: ignore[arg-type]
        return
    unwrap(model).load_state_dict(state)


def optimizer_state(optimizer: object, strategy: str, env: DistEnv) -> object:
    """What a checkpoint keeps of the optimizer: its state dict (replicated under DDP), or under
    FSDP every rank's shard of it, gathered to rank 0 (a collective) as a list by rank."""
    import torch

    assert isinstance(optimizer, torch.optim.Optimizer)
    sd = optimizer.state_dict()
    if not (env.is_distributed and strategy == "fsdp"):
        return sd
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    local = {
        "state": {
            k: {n: (v.to_local() if isinstance(v, DTensor) else v).cpu() for n, v in s.items()}
            for k, s in sd["state"].items()
        },
        "param_groups": sd["param_groups"],
    }
    out: list[object] | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(local, out, dst=0)
    return {"shards": out}


def load_optimizer_state(optimizer: object, saved: object, strategy: str, env: DistEnv) -> None:
    import torch

    assert isinstance(optimizer, torch.optim.Optimizer) and isinstance(saved, dict)
    if not (env.is_distributed and strategy == "fsdp"):
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.tensor import DTensor

    mine = saved["shards"][env.rank]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for k, s in mine["state"].items():
        p = params[int(k)]
        state[k] = {
            n: DTensor.from_local(
                v.to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
            )
            if isinstance(p, DTensor) and v.dim() > 0
            else v
            for n, v in s.items()
        }
    optimizer.load_state_dict({"state": state, "param_groups": mine["param_groups"]})


def gather_object(obj: object, env: DistEnv) -> list[object] | None:
    """Every rank's ``obj``, as a list by rank on rank 0 (None on the others); a collective."""
    if not env.is_distributed:
        return [obj]
    import torch.distributed as dist

    out: list[object] | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather_object(obj: object, env: DistEnv) -> list[object]:
    """Every rank's ``obj``, as a list by rank, on every rank; a collective."""
    if not env.is_distributed:
        return [obj]
    import torch.distributed as dist

    out: list[object] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, env: DistEnv) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not env.is_distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def live_bytes_tracker() -> object:
    """`ehrplan.runtime.measure.LiveTensorBytes` for sharded runs: it charges a DTensor's local
    shard, charges op inputs too, and re-reads every tracked storage's size after each op, because
    FSDP2 frees and re-allocates all-gathered parameters by resizing their storage outside the
    dispatcher and fills them through ``out=`` arguments."""
    import torch
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_flatten

    from ehrplan.runtime.measure import LiveTensorBytes

    class ShardedLiveTensorBytes(LiveTensorBytes):
        def _charge(self, t: torch.Tensor) -> None:
            if isinstance(t, DTensor):
                t = t._local_tensor
            super()._charge(t)

        def _resync(self) -> None:
            total = 0
            for entry in self._live.values():
                storage = entry[1]()
                if storage is not None:
                    entry[0] = storage.nbytes()
                    total += entry[0]
            self.current = total

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            for t in tree_flatten((args, kwargs or {}))[0]:
                if isinstance(t, torch.Tensor):
                    self._charge(t)
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._charge(t)
            self._resync()
            self.peak = max(self.peak, self.current)
            return out

    return ShardedLiveTensorBytes()
