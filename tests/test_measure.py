"""The measurer: the live-bytes tracker, the measured step, devices, the loss, and real options."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from ehrplan.errors import DeviceError
from ehrplan.plan.config import get_preset
from ehrplan.runtime.batch import synthetic_batch
from ehrplan.runtime.measure import LiveTensorBytes, make_step, measure_step, resolve_device
from ehrplan.runtime.models import build_model
from ehrplan.runtime.training.loss import ProgressionLoss


def test_tracker_counts_storages_once_and_releases_them():
    tracker = LiveTensorBytes()
    with tracker:
        a = torch.empty(1000)  # 4,000 bytes
        view = a[10:20]  # a view: no new storage
        b = torch.ones(500, dtype=torch.int64)  # 4,000 bytes
        assert tracker.current == 8000
        del a, b
        assert tracker.current == 4000  # the view keeps a's storage alive
        del view
    assert tracker.current == 0
    assert tracker.peak == 8000


def test_tracker_agrees_with_torch_memtracker():
    """On a model without PackedSequence inputs, torch's own MemTracker sees the same peak."""
    from torch.distributed._tools.mem_tracker import MemTracker

    cfg = get_preset("tiny-transformer").config
    peaks = []
    for use_memtracker in (True, False):
        torch.manual_seed(0)
        model = build_model(cfg)
        opt = torch.optim.Adam(model.parameters())
        batch = synthetic_batch(cfg, 16)
        loss = ProgressionLoss()
        step = make_step(model, opt, batch, device="cpu", precision="fp32", loss_fn=loss)
        step(1)
        opt.zero_grad(set_to_none=True)
        inputs = [getattr(batch, f.name) for f in fields(batch)]
        if use_memtracker:
            mt = MemTracker()
            mt.track_external(model, loss, opt, *inputs)
            with mt:
                step(1)
            peaks.append(mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])
        else:
            tracker = LiveTensorBytes()
            tracker.track(
                [*model.parameters(), *loss.parameters(), *loss.buffers()],
                [list(s.values()) for s in opt.state.values()],
                inputs,
            )
            with tracker:
                step(1)
            peaks.append(tracker.peak)
    assert peaks[0] == peaks[1]


def test_measured_step_is_deterministic_and_above_the_static_memory():
    cfg = get_preset("tiny").config
    a = measure_step(cfg, batch_size=4)
    b = measure_step(cfg, batch_size=4)
    assert a.measured_peak_bytes == b.measured_peak_bytes
    static = 16 * cfg.total_params  # params + grads + Adam's two moments, fp32
    assert a.measured_peak_bytes > static
    assert a.device == "cpu" and a.micro_batches == min(cfg.gradient_accumulation_steps, 2)
    assert a.process_peak_rss_bytes > a.measured_peak_bytes


def test_checkpointing_is_a_real_option():
    """Checkpointed Transformer blocks keep less for backward: the measured peak drops."""
    cfg = get_preset("tiny-transformer").config.model_copy(update={"vocab_size": 64})
    off = measure_step(cfg, batch_size=64, checkpointing=False)
    on = measure_step(cfg, batch_size=64, checkpointing=True)
    assert on.checkpointing and not off.checkpointing
    assert on.measured_peak_bytes < off.measured_peak_bytes


def test_mixed_precision_step_runs_under_autocast():
    cfg = get_preset("tiny-transformer").config
    m = measure_step(cfg, batch_size=4, precision="bf16")
    assert m.precision == "bf16" and m.measured_peak_bytes > 0


def test_unknown_and_absent_devices_are_device_errors():
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu")
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="not present"):
            resolve_device("cuda")
