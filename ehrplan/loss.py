"""The loss of one training step on both heads (imports torch).

`progression_loss` is the one function the measured step (`ehrplan.measure`) calls; the trainer
may replace it with a censored survival loss later without touching the measurer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ehrplan.batch import IGNORE_INDEX, Batch


def progression_loss(
    stage_logits: torch.Tensor, time_pred: torch.Tensor, batch: Batch
) -> torch.Tensor:
    """Cross-entropy on the stage at every real visit plus a masked MSE on ``log1p`` of the time
    to progression at visits whose next stage change was observed.

    ``stage_logits`` is ``[B, V, num_stages]``, ``time_pred`` ``[B, V, 1]`` (positive). Both are
    taken in fp32, so the loss is the same under autocast.
    """
    stage = F.cross_entropy(
        stage_logits.flatten(0, 1).float(), batch.stage.flatten(), ignore_index=IGNORE_INDEX
    )
    observed = batch.event_observed.to(torch.float32)
    target = torch.log1p(batch.time_to_event.clamp(min=0))
    err = (time_pred.squeeze(-1).float() - target).pow(2)
    time = (err * observed).sum() / observed.sum().clamp(min=1.0)
    return stage + time
