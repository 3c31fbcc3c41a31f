"""The trainer's parts: censored survival loss, atomic checkpoints, evaluation metrics."""

from __future__ import annotations

import errno
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from ehrplan.errors import OutputError, UsageError
from ehrplan.runtime.batch import IGNORE_INDEX, Batch
from ehrplan.runtime.training import checkpoint as ckpt
from ehrplan.runtime.training.loss import (
    ProgressionLoss,
    days_to_years,
    lognormal_nll,
    population_median_years,
)
from ehrplan.runtime.training.metrics import (
    Predictions,
    concordance,
    evaluate_predictions,
    macro_auroc,
)

# ---------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("log_sigma", [-0.7, 0.0, 0.5])
def test_lognormal_nll_is_scipys_density_and_survival(log_sigma: float) -> None:
    g = np.random.default_rng(0)
    median = g.uniform(0.1, 5.0, 50)
    t = g.uniform(0.01, 8.0, 50)
    observed = g.random(50) < 0.5
    got = lognormal_nll(
        torch.tensor(median), torch.tensor(t), torch.tensor(observed), torch.tensor(log_sigma)
    ).numpy()
    dist = stats.lognorm(s=math.exp(log_sigma), scale=median)
    want = np.where(observed, -dist.logpdf(t), -dist.logsf(t))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_censored_visit_pushes_the_prediction_later_not_towards_the_censoring_time() -> None:
    """A censored time is a lower bound: predicting later must never cost more (MSE would)."""
    t = torch.tensor([1.0])
    medians = torch.tensor([0.5, 1.0, 2.0, 8.0])
    cens = lognormal_nll(medians, t, torch.tensor([False]), torch.tensor(0.0))
    assert torch.all(cens[1:] < cens[:-1])
    obs = lognormal_nll(medians, t, torch.tensor([True]), torch.tensor(0.0))
    assert obs.argmin().item() == 1  # an observed event is best predicted at its own time


def _batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    B, V, C = 3, 4, 5
    code_mask = torch.zeros(B, V, C, dtype=torch.bool)
    code_mask[0, :2, :3] = True
    code_mask[1, :4, :2] = True
    code_mask[2, :1, :5] = True
    stage = torch.randint(0, 5, (B, V), generator=g).masked_fill(~code_mask.any(-1), IGNORE_INDEX)
    return Batch(
        codes=torch.randint(1, 50, (B, V, C), generator=g) * code_mask,
        code_mask=code_mask,
        time_features=torch.rand(B, V, 2, generator=g),
        stage=stage,
        time_to_event=torch.rand(B, V, generator=g) * 900,
        event_observed=(torch.rand(B, V, generator=g) < 0.5) & code_mask.any(-1),
    )


def test_loss_ignores_padded_visits() -> None:
    b = _batch()
    loss = ProgressionLoss()
    logits = torch.randn(3, 4, 5)
    time_pred = torch.rand(3, 4, 1) + 0.1
    base = loss(logits, time_pred, b)
    pad = ~b.visit_mask
    logits2 = logits.masked_fill(pad.unsqueeze(-1), 100.0)
    time2 = time_pred.masked_fill(pad.unsqueeze(-1), 1e-4)
    b.time_to_event = b.time_to_event.masked_fill(pad, 1e6)
    again = loss(logits2, time2, b)
    assert base.visits == int(b.visit_mask.sum()) == again.visits
    torch.testing.assert_close(base.total, again.total)


def test_days_are_clamped_so_a_same_day_event_is_finite() -> None:
    nll = lognormal_nll(
        torch.tensor([0.5]),
        days_to_years(torch.tensor([0.0])),
        torch.tensor([True]),
        torch.zeros(()),
    )
    assert torch.isfinite(nll).all()


# ---------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_with_safe_loader(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = tmp_path / "c" / "last.pt"
    ckpt.save_checkpoint(
        path,
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": ckpt.rng_state()},
    )
    state = ckpt.load_checkpoint(path)  # weights_only=True inside
    assert torch.equal(state["model"]["weight"], model.weight.detach())
    torch.manual_seed(123)
    a = torch.rand(3)
    ckpt.set_rng_state(state["rng"])
    ckpt.set_rng_state(ckpt.rng_state())  # restoring twice is harmless
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), a)


def test_a_crash_while_saving_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint(path, {"step": 1})

    def torn_save(obj: object, f) -> None:  # type: ignore[no-untyped-def]
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OutputError, match=f"disk full: cannot write {path}"):
        ckpt.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["step"] == 1


def test_a_foreign_or_torn_file_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="cannot read checkpoint"):
        ckpt.load_checkpoint(bad)
    with pytest.raises(UsageError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")


# ---------------------------------------------------------------------------------- metrics


def test_concordance_orders_and_censoring() -> None:
    t = np.array([1.0, 2.0, 3.0, 4.0])
    obs = np.array([True, True, True, True])
    assert concordance(t, t, obs) == 1.0
    assert concordance(t, -t, obs) == 0.0
    assert concordance(t, t, np.zeros(4, dtype=bool)) is None
    # a visit censored at 1.0 cannot be ordered against later events: only 3 comparable pairs
    # among the observed 2, 3, 4 plus none from the censored one
    cens = np.array([False, True, True, True])
    assert concordance(t, np.array([9.0, 2.0, 3.0, 4.0]), cens) == 1.0


def test_macro_auroc_skips_absent_classes_and_metrics_have_baselines() -> None:
    y = np.array([0, 0, 1, 1, 3, 3])
    prob = np.eye(5)[y] * 0.9 + 0.02
    assert macro_auroc(y, prob) == 1.0
    p = Predictions(
        stage=y,
        stage_prob=prob,
        time_days=np.arange(6.0) + 1,
        observed=np.ones(6, dtype=bool),
        predicted_days=np.arange(6.0) + 1,
    )
    m = evaluate_predictions(p, majority_stage=0)
    assert m["stage_macro_f1"] == 1.0 and m["stage_qw_kappa"] == 1.0
    assert m["baseline_stage_macro_f1"] < 0.5
    assert m["c_index"] == 1.0 and m["mae_days_observed"] == 0.0


def test_population_median_recovers_a_censored_lognormal() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.exp(torch.randn(20000, generator=g) * 0.8 + 1.0) * 365.25  # median e years
    c = torch.rand(20000, generator=g) * 3000  # censoring days, hits about half
    m = population_median_years(torch.minimum(t, c), t <= c)
    assert abs(m - math.e) / math.e < 0.03
    naive = float(days_to_years(torch.minimum(t, c)).median())
    assert naive < 0.8 * math.e  # ignoring censoring would say "sooner"


# ------------------------------------------------------------------------------ the schedule


def test_bucketing_pools_patients_not_batches() -> None:
    from ehrplan.runtime.training.schedule import bucket_pool, epoch_batches

    assert (bucket_pool(4), bucket_pool(32), bucket_pool(64), bucket_pool(500)) == (50, 6, 3, 1)
    assert bucket_pool(32, 0) == 1  # --bucket-patients 0: no bucketing
    lengths = np.random.default_rng(0).integers(1, 100, 400)
    for pool in (1, 6):
        batches = epoch_batches(lengths, 32, seed=3, epoch=1, pool=pool)
        assert sorted(i for b in batches for i in b) == list(range(400))
        assert batches == epoch_batches(lengths, 32, seed=3, epoch=1, pool=pool)  # replayable
    # bucketed batches are tighter in length than random ones
    spread = {
        pool: np.mean([np.ptp(lengths[b]) for b in epoch_batches(lengths, 32, 3, 1, pool)])
        for pool in (1, 6)
    }
    assert spread[6] < spread[1] / 2


def test_the_trainer_trains_the_planned_precision_on_a_t4(monkeypatch) -> None:
    # torch.cuda.is_bf16_supported() is True on a T4 (emulated); the plan says fp16 there
    import torch

    from ehrplan.plan.config import get_preset
    from ehrplan.runtime.training import device as device_mod

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cfg = get_preset("small-lstm").config
    cuda = torch.device("cuda")
    assert device_mod.resolve_precision(cfg, cuda, "auto") == "fp16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 6))
    assert device_mod.resolve_precision(cfg, cuda, "auto") == "bf16"
    cpu = device_mod.device_target(torch.device("cpu"))
    assert device_mod.resolve_precision(cfg, torch.device("cpu"), "auto") == (
        cpu.native_half or "fp32"
    )
