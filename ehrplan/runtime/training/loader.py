"""Micro-batches in the order the trainer (or the evaluator) runs them: collated in this process,
or by DataLoader worker processes that collate ahead while the model steps.

`feed` takes the list of index lists the caller will consume, in order (the trainer's share of
an epoch's steps from its resume point, stand-ins included; the evaluator's chunks of a split),
and yields one `Batch` per list on the device. With ``workers=0`` each batch is collated when it
is asked for (the step's own time includes it); with ``workers=N`` a DataLoader over exactly that
list (``batch_sampler``) collates in N processes, ``prefetch`` batches ahead per worker, pinned on
CUDA, and yields them in the list's order, so the batches, and therefore the losses, are the ones
``workers=0`` gives (tests/test_training_loader.py).

Workers are forked on Linux and share the parent's pages (the memory-mapped cache and every
array `load_training_data` built): nothing is copied per worker. Elsewhere they are spawned and
get the data set by pickle. Workers ignore Ctrl-C: the main process handles it (saves, says where
the run stands) and shuts the workers down on the way out; SIGINT is blocked while they start so
that one arriving then waits for the main process instead of reaching a half-started worker.
"""

from __future__ import annotations

import signal
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ehrplan.runtime.batch import Batch

PREFETCH = 2
"""Batches each worker collates ahead (DataLoader's ``prefetch_factor``)."""


def default_workers(device_type: str) -> int:
    """Worker processes when ``--workers`` is not given: none on the CPU, where the step's own
    threads want the cores and a worker would take one from them; 2 where the step runs on a
    GPU and the host's cores are free to collate ahead."""
    return 0 if device_type == "cpu" else 2


def start_method() -> str | None:
    """``fork`` on Linux (workers share the parent's pages); elsewhere the platform's default
    (spawn on macOS, where forking a process that has loaded Apple's frameworks is unsafe). The
    rule is `ehrplan.data.cache.worker_start_method`'s, which the data-memory plan counts by."""
    from ehrplan.data.cache import worker_start_method

    return "fork" if worker_start_method() == "fork" else None


def _worker_init(worker_id: int) -> None:
    """In each worker: Ctrl-C is the main process's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT held back (not lost) while workers start: they inherit the blocked mask and ignore
    the signal before unblocking it; the main process gets a pending one when this ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextmanager
def feed(
    dataset: Sequence[Any],
    collate: Callable[[list[Any]], Batch],
    index_lists: Sequence[Sequence[int]],
    device: torch.device,
    workers: int = 0,
    prefetch: int = PREFETCH,
) -> Iterator[Iterator[Batch]]:
    """An iterator of ``collate([dataset[i] for i in idx]).to(device)`` for each ``idx`` of
    ``index_lists`` in order; worker processes (when ``workers > 0``) stop when the block ends,
    whether or not every batch was taken."""
    if workers <= 0 or not index_lists:
        yield (collate([dataset[i] for i in idx]).to(device) for idx in index_lists)
        return
    pin = device.type == "cuda"
    with warnings.catch_warnings():  # more workers than cores: `train` says so in one line
        warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)
        loader, it = _start(dataset, collate, index_lists, workers, prefetch, pin)
    try:
        yield (b.to(device, non_blocking=pin) for b in it)
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)  # what the iterator's __del__ calls
        if shutdown is not None:
            shutdown()
        del it, loader


def _start(
    dataset: Sequence[Any],
    collate: Callable[[list[Any]], Batch],
    index_lists: Sequence[Sequence[int]],
    workers: int,
    prefetch: int,
    pin: bool,
) -> tuple[Any, Any]:
    """The DataLoader over exactly ``index_lists`` and its iterator (the workers started)."""
    loader = torch.utils.data.DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_sampler=[list(idx) for idx in index_lists],
        collate_fn=collate,
        num_workers=workers,
        prefetch_factor=prefetch,
        persistent_workers=False,
        pin_memory=pin,
        multiprocessing_context=start_method(),
        worker_init_fn=_worker_init,
        # the workers' seed comes from this generator, not torch's global one: the dropout
        # masks of the steps are those of workers=0
        generator=torch.Generator().manual_seed(0),
    )
    with _sigint_blocked():
        return loader, iter(loader)


def cores() -> int:
    """The CPU cores this process may run on."""
    import os

    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
