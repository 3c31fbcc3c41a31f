"""Model behaviour: padding and empty visits change nothing, predictions are causal, one call."""

from __future__ import annotations

import pytest
import torch

from ehrplan.plan.config import get_preset, resolve_config
from ehrplan.runtime.batch import synthetic_batch
from ehrplan.runtime.models import (
    LSTMProgressionModel,
    LSTMVisitEncoder,
    TransformerProgressionModel,
    build_model,
)

FAMILIES = ["tiny-lstm", "tiny-transformer"]
ATOL = 1e-5


def make(name: str, **overrides):
    config, _ = resolve_config(preset=name, overrides=overrides)
    torch.manual_seed(0)
    return config, build_model(config).eval()


def patient(config, visits: int, codes: int, seed: int = 1):
    """One patient (batch of 1) with ``visits`` real visits of up to ``codes`` codes each;
    visit i holds ``1 + i % codes`` real codes, the rest padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.vocab_size, (1, visits, codes), generator=g)
    n_real = torch.tensor([1 + i % codes for i in range(visits)])
    mask = torch.arange(codes)[None, None, :] < n_real[None, :, None]
    ids = ids * mask
    times = torch.rand(1, visits, 2, generator=g)
    return ids, times, mask


def pad(ids, times, mask, visits: int = 0, codes: int = 0):
    """Append ``visits`` padded visits and ``codes`` padded code slots."""
    ids = torch.nn.functional.pad(ids, (0, codes, 0, visits))
    mask = torch.nn.functional.pad(mask, (0, codes, 0, visits))
    times = torch.nn.functional.pad(times, (0, 0, 0, visits), value=0.7)
    return ids, times, mask


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("extra_visits, extra_codes", [(0, 3), (4, 0), (2, 5)])
def test_padding_changes_nothing(name, extra_visits, extra_codes):
    config, model = make(name)
    ids, times, mask = patient(config, visits=5, codes=4)
    stage, t = model(ids, times, mask)
    stage2, t2 = model(*pad(ids, times, mask, extra_visits, extra_codes))
    torch.testing.assert_close(stage2[:, :5], stage, atol=ATOL, rtol=0)
    torch.testing.assert_close(t2[:, :5], t, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_padding_in_a_batch_matches_the_patient_alone(name):
    """A short patient batched with a long one gets the outputs it gets alone."""
    config, model = make(name)
    short = patient(config, visits=3, codes=2, seed=1)
    long = patient(config, visits=7, codes=6, seed=2)
    padded_short = pad(*short, visits=4, codes=4)
    batch = [torch.cat([a, b]) for a, b in zip(padded_short, long, strict=True)]
    stage_b, time_b = model(*batch)
    stage_s, time_s = model(*short)
    torch.testing.assert_close(stage_b[:1, :3], stage_s, atol=ATOL, rtol=0)
    torch.testing.assert_close(time_b[:1, :3], time_s, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_empty_visits_appended_change_nothing(name):
    """Empty visits carry time features but no codes; appended, they change nothing before."""
    config, model = make(name)
    ids, times, mask = patient(config, visits=4, codes=3)
    ids2, times2, mask2 = pad(ids, times, mask, visits=3)
    times2[:, 4:] = torch.rand(1, 3, 2)  # the empty visits have real times
    stage, _ = model(ids, times, mask)
    stage2, _ = model(ids2, times2, mask2)
    torch.testing.assert_close(stage2[:, :4], stage, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_future_visits_do_not_change_earlier_predictions(name):
    config, model = make(name)
    ids, times, mask = patient(config, visits=6, codes=4)
    stage, _ = model(ids, times, mask)
    ids2, times2 = ids.clone(), times.clone()
    ids2[:, 4] = torch.where(mask[:, 4], (ids[:, 4] % (config.vocab_size - 1)) + 1, 0)
    times2[:, 5] += 3.0
    stage2, _ = model(ids2, times2, mask)
    torch.testing.assert_close(stage2[:, :4], stage[:, :4], atol=ATOL, rtol=0)
    assert not torch.allclose(stage2[:, 4:], stage[:, 4:])  # the change itself is seen


@pytest.mark.parametrize("name", FAMILIES)
def test_within_visit_encoder_runs_once_per_batch(name):
    config, model = make(name)
    calls = []
    target = model.encoder.visit_lstm if name.endswith("lstm") else model.encoder.visit_projection
    target.register_forward_hook(lambda *_: calls.append(1))
    model(*synthetic_batch(config, 3).model_inputs())
    assert len(calls) == 1


def varied_batch(config, B: int = 6, V: int = 7, seed: int = 3):
    """A batch whose visits hold 1..max_codes_per_visit real codes (and some empty visits)."""
    g = torch.Generator().manual_seed(seed)
    C = config.max_codes_per_visit
    n_real = torch.randint(0, C + 1, (B, V), generator=g)
    mask = torch.arange(C)[None, None, :] < n_real[..., None]
    ids = torch.randint(1, config.vocab_size, (B, V, C), generator=g) * mask
    return ids, torch.rand(B, V, 2, generator=g), mask


def test_length_groups_give_the_one_call_result(monkeypatch):
    """On the CPU the within-visit LSTM runs length groups; outputs and gradients are those of
    one call over every real visit padded to the longest."""
    import functools

    import ehrplan.plan.grouping
    import ehrplan.runtime.models.lstm as lstm_module

    config = get_preset("tiny-lstm").config.model_copy(update={"dropout": 0.0})
    inputs = varied_batch(config)
    results = []
    for grouped in (True, False):
        torch.manual_seed(0)
        model = build_model(config)
        calls: list[int] = []
        model.encoder.visit_lstm.register_forward_hook(lambda *_, c=calls: c.append(1))
        monkeypatch.setattr(lstm_module, "grouping_enabled", lambda _t, g=grouped: g)
        # every distinct length its own group: the most groups the plan can make
        plan = functools.partial(ehrplan.plan.grouping.plan_groups, call_slots=0)
        monkeypatch.setattr(lstm_module, "plan_groups", plan)
        stage, t = model(*inputs)
        (stage.square().mean() + t.mean()).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((stage, t, grads, len(calls)))
    (s1, t1, g1, calls_grouped), (s2, t2, g2, calls_one) = results
    lengths = inputs[2].sum(-1).flatten().tolist()
    assert calls_one == 1 and calls_grouped == len({n for n in lengths if n > 0}) > 1
    torch.testing.assert_close(s1, s2, atol=ATOL, rtol=0)
    torch.testing.assert_close(t1, t2, atol=ATOL, rtol=0)
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_checkpointing_gives_the_same_loss_and_gradients(name):
    config = get_preset(name).config
    batch = synthetic_batch(config, 4)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(config.model_copy(update={"use_checkpoint": ckpt, "dropout": 0.0}))
        stage, t = model(*batch.model_inputs())
        (stage.square().mean() + t.mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_transformer_flash_and_explicit_attention_agree():
    config = get_preset("tiny-transformer").config.model_copy(update={"dropout": 0.0})
    batch = synthetic_batch(config, 2)
    outs = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = build_model(config.model_copy(update={"use_flash_attention": fused}))
        outs.append(model(*batch.model_inputs())[0])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)


def test_seed_constructor_signatures_still_work():
    m = LSTMProgressionModel(vocab_size=50, code_embed_dim=8, visit_embed_dim=8, hidden_dim=8)
    t = TransformerProgressionModel(vocab_size=50, embed_dim=8, hidden_dim=16, num_heads=2)
    ids = torch.randint(1, 50, (2, 3, 4))
    for model in (m, t):
        stage, time = model(ids, torch.zeros(2, 3, 2), ids > 0)
        assert stage.shape == (2, 3, 5) and time.shape == (2, 3, 1)
        assert (time >= 0).all()
    with pytest.raises(ValueError, match="causal"):
        LSTMVisitEncoder(vocab_size=10, bidirectional=True)


def test_too_many_visits_for_the_transformer_is_a_clear_error():
    config, model = make("tiny-transformer")
    batch = synthetic_batch(config, 1, visits=config.max_visits + 1)
    with pytest.raises(ValueError, match="exceed max_visits"):
        model(*batch.model_inputs())


@pytest.mark.parametrize("name", FAMILIES)
def test_final_hidden_is_the_state_at_the_last_real_visit(name):
    config, model = make(name)
    ids, times, mask = pad(*patient(config, visits=4, codes=3), visits=3)
    out, final = model.encoder(ids, times, mask)
    torch.testing.assert_close(final, out[:, 3])
