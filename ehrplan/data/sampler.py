"""Which patients go into which batch: shuffled, optionally bucketed by length (no torch).

Length bucketing: shuffle the patients, cut them into pools of ``pool_batches`` batches, sort
each pool by length (kept visits, then largest kept visit), cut it into batches and shuffle the
batch order. Patients of similar length share a batch, so per-batch padding pays for little,
while every epoch still sees a different mix (the pool-then-sort scheme of torchtext's
BucketIterator and fairseq's length-grouped batching).

`BucketBatchSampler` is an iterable of index lists, usable as a torch DataLoader's
``batch_sampler``; `batches` is the same thing as a function, for statistics.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

DEFAULT_POOL_BATCHES = 50


def batches(
    lengths: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = True,
    bucketing: bool = False,
    seed: int = 0,
    pool_batches: int = DEFAULT_POOL_BATCHES,
    drop_last: bool = False,
) -> list[np.ndarray]:
    """Batches of positions 0..len(lengths)-1; ``lengths`` is a sort key (bigger = longer)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
    n = len(lengths)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n) if shuffle else np.arange(n)
    if bucketing:
        pool = batch_size * pool_batches
        parts = []
        for s in range(0, n, pool):
            chunk = order[s : s + pool]
            parts.append(chunk[np.argsort(lengths[chunk], kind="stable")])
        order = np.concatenate(parts) if parts else order
    out = [order[s : s + batch_size] for s in range(0, n, batch_size)]
    if drop_last and out and len(out[-1]) < batch_size:
        out.pop()
    if bucketing and shuffle:
        out = [out[i] for i in rng.permutation(len(out))]
    return out


class BucketBatchSampler:
    """An iterable of batches of dataset positions; ``set_epoch`` reshuffles."""

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = True,
        bucketing: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.bucketing = bucketing
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[np.ndarray]:
        return batches(
            self.lengths,
            self.batch_size,
            shuffle=self.shuffle,
            bucketing=self.bucketing,
            seed=self.seed + self.epoch,
            drop_last=self.drop_last,
        )

    def __iter__(self) -> Iterator[list[int]]:
        for b in self._batches():
            yield b.tolist()

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)
