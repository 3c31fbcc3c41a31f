"""The batch every model, loss, dry run and trainer agrees on (imports torch).

Shapes: B patients, V visits (padded to the longest patient in the batch), C codes (padded to the
largest visit in the batch). Real codes come first within a visit and real visits first within a
patient; padding is id 0 / False / label -100.

Pickling (what a DataLoader worker does to hand a batch to the training process) sends a CPU
batch's tensors as numpy arrays, by value through the pipe. torch's own reduction would move each
tensor into a shared-memory segment and pass its file descriptor over a fresh connection to the
worker, six times per batch, which costs far more than copying a batch's few hundred kilobytes:
with 2 workers it gave 7.6x fewer examples/s at batch 4 and 4.5x fewer at batch 32
(`benchmarks/data_loading.py`, its ``torch_pickle`` rows in ``benchmarks/data/``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from ehrplan.plan.config import EHRModelConfig

IGNORE_INDEX = -100  # stage label of a padded visit (torch's cross-entropy default)


@dataclass
class Batch:
    """One micro-batch of patients."""

    codes: torch.Tensor
    """int64 [B, V, C]: code ids, PAD = 0."""
    code_mask: torch.Tensor
    """bool [B, V, C]: True where a code is real."""
    time_features: torch.Tensor
    """float32 [B, V, 2]: scaled days since the previous visit and since the first visit."""
    stage: torch.Tensor
    """int64 [B, V]: disease stage 0..num_stages-1 at each visit, IGNORE_INDEX on padding."""
    time_to_event: torch.Tensor
    """float32 [B, V]: days to the next stage change, or to censoring when none is seen."""
    event_observed: torch.Tensor
    """bool [B, V]: True when the next stage change was seen (False: censored or padding)."""

    @property
    def visit_mask(self) -> torch.Tensor:
        """bool [B, V]: True for real (non-empty) visits."""
        return self.code_mask.any(-1)

    @property
    def num_patients(self) -> int:
        return int(self.codes.shape[0])

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickle CPU tensors as numpy arrays (by value; see the module docstring), others as
        tensors (torch's own reduction)."""
        ts = [getattr(self, f.name) for f in fields(self)]
        if all(t.device.type == "cpu" and not t.requires_grad for t in ts):
            return _batch_from_numpy, tuple(t.numpy() for t in ts)
        return Batch, tuple(ts)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            **{
                f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                for f in fields(self)
            }
        )

    def pin_memory(self) -> Batch:
        """Every tensor in page-locked memory (a DataLoader with ``pin_memory`` calls this), so
        that ``to(cuda, non_blocking=True)`` overlaps the copy with the step."""
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    def visit_groups(self) -> list[tuple[int, int]]:
        """``(visits, codes)`` of the length groups the CPU within-visit LSTM runs for this
        batch (`ehrplan.plan.grouping`), for the estimator's data-shaped estimate."""
        from ehrplan.plan.grouping import group_shapes

        return group_shapes(self.code_mask.sum(-1).flatten().tolist())

    def encoder_groups(self, model_type: str, device_type: str) -> list[tuple[int, int]] | None:
        """`visit_groups` where the model runs them: an LSTM on a device that groups; None where
        the within-visit encoder makes one call."""
        from ehrplan.plan.grouping import grouping_enabled

        if model_type != "lstm" or not grouping_enabled(device_type):
            return None
        return self.visit_groups()

    def model_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The positional arguments of the models' ``forward``."""
        return self.codes, self.time_features, self.code_mask


def _batch_from_numpy(*arrays: np.ndarray) -> Batch:
    """A `Batch` from its fields' arrays, in field order (the other half of `Batch.__reduce__`)."""
    return Batch(*(torch.from_numpy(a) for a in arrays))


def synthetic_batch(
    config: EHRModelConfig,
    batch_size: int | None = None,
    *,
    visits: int | None = None,
    codes: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Batch:
    """A fully padded batch shaped as the config says (every visit real, every code real):
    ``batch_size x max_visits x max_codes_per_visit`` unless ``visits``/``codes`` say otherwise.
    Random ids and labels, for dry runs and tests."""
    B = batch_size or config.batch_size
    V = visits or config.max_visits
    C = codes or config.max_codes_per_visit
    g = torch.Generator().manual_seed(seed)
    batch = Batch(
        codes=torch.randint(1, config.vocab_size, (B, V, C), generator=g),
        code_mask=torch.ones(B, V, C, dtype=torch.bool),
        time_features=torch.rand(B, V, 2, generator=g),
        stage=torch.randint(0, config.num_stages, (B, V), generator=g),
        time_to_event=torch.rand(B, V, generator=g) * 365.0,
        event_observed=torch.rand(B, V, generator=g) < 0.5,
    )
    return batch.to(device)
