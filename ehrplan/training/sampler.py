"""The order of training batches: a pure function of (seed, epoch), so a resumed run replays it.

Each epoch: a seeded permutation of the training patients; within windows of ``bucket`` batches the
patients are sorted by length (visits x codes), so a batch holds patients of similar size and
per-batch padding stays small; then the order of the batches is shuffled with the same generator.
Position in an epoch is the index of the next batch, so resuming is "rebuild the epoch's batch
list, skip what was done" — no sampler state to pickle.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_BUCKET = 50  # batches per sorting window: low padding, still a fresh mix every epoch


def epoch_batches(
    lengths: Sequence[int] | np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int,
    bucket: int = DEFAULT_BUCKET,
) -> list[list[int]]:
    """Index lists of the micro-batches of one epoch (the last one may be short)."""
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if bucket > 1:
        lens = np.asarray(lengths)
        window = batch_size * bucket
        chunks = [order[i : i + window] for i in range(0, n, window)]
        # stable sort by length inside each window; ties keep the random order
        order = np.concatenate([c[np.argsort(lens[c], kind="stable")] for c in chunks])
    batches = [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]
    if bucket > 1:
        perm = rng.permutation(len(batches))
        batches = [batches[i] for i in perm]
    return batches


def steps_per_epoch(n_patients: int, batch_size: int, accumulation: int) -> int:
    """Optimizer steps in one epoch: micro-batches / accumulation, the last group may be short."""
    micro = -(-n_patients // batch_size)  # ceil
    return -(-micro // accumulation)
