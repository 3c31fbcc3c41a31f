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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ehrplan.errors import UsageError

if TYPE_CHECKING:
    from torch import nn

Strategy = Literal["ddp", "fsdp"]
STRATEGIES: tuple[str, ...] = ("ddp", "fsdp")


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


def check_strategy(strategy: str, world_size: int) -> None:
    """Refuse unknown strategies, and FSDP on one process (sharding over one rank is DDP-less
    single-device training with extra all-gathers)."""
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy '{strategy}' (valid: {', '.join(STRATEGIES)})")
    if strategy == "fsdp" and world_size < 2:
        raise UsageError("--shard (FSDP) needs a world size of at least 2; run under torchrun")


def shard_blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP shards one by one: each embedding table, each LSTM, each Transformer
    block. The root module is sharded last and holds what is left (projections, heads)."""
    from torch import nn

    from ehrplan.models.transformer import TransformerBlock

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
        from torch.distributed.fsdp import fully_shard

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
