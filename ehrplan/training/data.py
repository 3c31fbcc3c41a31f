"""What the trainer needs from a data set, and the adapter that builds it from `ehrplan.data`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ehrplan.batch import Batch


@dataclass
class Split:
    """One split: an indexable set of patients and a size per patient (for length bucketing)."""

    dataset: Sequence[Any]
    lengths: np.ndarray


@dataclass
class TrainData:
    """The splits, the collate that turns patients into a `Batch`, and what the run folder keeps."""

    splits: dict[str, Split]
    collate: Callable[[list[Any]], Batch]
    vocab: dict[str, Any]
    majority_stage: int
    source: str
    info: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> Split:
        return self.splits[name]
