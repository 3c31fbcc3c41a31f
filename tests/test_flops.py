"""Analytic FLOPs of a training step against torch's FlopCounterMode on the built models."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ehrplan.plan.config import get_preset
from ehrplan.plan.flops import training_step_flops
from ehrplan.runtime.batch import synthetic_batch
from ehrplan.runtime.models import build_model
from ehrplan.runtime.training.loss import ProgressionLoss


@pytest.mark.parametrize("name", ["tiny-lstm", "tiny-transformer", "small-transformer"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_flops_match_the_flop_counter(name, ckpt):
    cfg = get_preset(name).config.model_copy(update={"use_checkpoint": ckpt})
    batch = synthetic_batch(cfg, 3, visits=min(cfg.max_visits, 10))
    torch.manual_seed(0)
    model = build_model(cfg)
    # FlopCounterMode has no formula for oneDNN's fused LSTM op; the native LSTM runs the
    # same products as aten mm/addmm, which it counts
    torch.backends.mkldnn.enabled = False
    try:
        with FlopCounterMode(display=False) as counter:
            ProgressionLoss()(*model(*batch.model_inputs()), batch).total.backward()
    finally:
        torch.backends.mkldnn.enabled = True
    analytic = training_step_flops(cfg, batch_size=3, visits=min(cfg.max_visits, 10))
    assert analytic.per_micro_batch == counter.get_total_flops()


def test_optimizer_step_multiplies_by_accumulation():
    cfg = get_preset("small-transformer").config
    f = training_step_flops(cfg)
    assert f.per_optimizer_step == f.per_micro_batch * cfg.gradient_accumulation_steps
    assert f.backward > f.forward > 0
