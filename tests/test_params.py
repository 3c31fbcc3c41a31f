"""The analytic parameter count equals the built model's, for every preset and random configs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ehrplan.plan.config import EHRModelConfig, load_presets
from ehrplan.plan.params import COMPONENTS, count_parameters
from ehrplan.runtime.models import build_model


def built_count(config: EHRModelConfig) -> int:
    with torch.device("meta"):  # shapes only: no memory for the large presets
        model = build_model(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(load_presets()))
def test_preset_counts_are_exact(name):
    config = load_presets()[name].config
    breakdown = count_parameters(config)
    assert breakdown.total == built_count(config)
    assert tuple(breakdown.components) == COMPONENTS
    assert sum(breakdown.modules.values()) == breakdown.total


def test_module_breakdown_matches_built_modules():
    for name in ("small-lstm", "small-transformer"):
        config = load_presets()[name].config
        with torch.device("meta"):
            model = build_model(config)
        for path, n in count_parameters(config).modules.items():
            module = model.get_submodule(path)
            assert sum(p.numel() for p in module.parameters()) == n, path


@st.composite
def configs(draw) -> EHRModelConfig:
    model_type = draw(st.sampled_from(["lstm", "transformer"]))
    heads = draw(st.integers(1, 4))
    visit_dim = heads * draw(st.integers(1, 12)) if model_type == "transformer" else None
    return EHRModelConfig(
        model_type=model_type,
        code_embed_dim=draw(st.integers(1, 48)),
        visit_embed_dim=visit_dim or draw(st.integers(1, 48)),
        hidden_dim=draw(st.integers(1, 64)),
        num_layers=draw(st.integers(1, 4)),
        num_heads=heads if model_type == "transformer" else None,
        vocab_size=draw(st.integers(2, 5000)),
        max_visits=draw(st.integers(1, 300)),
        num_stages=draw(st.integers(2, 9)),
        dropout=draw(st.floats(0.0, 0.9)),
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_random_configs_are_exact(config):
    assert count_parameters(config).total == built_count(config)


@pytest.mark.parametrize("name", ["small-lstm", "small-transformer"])
def test_frozen_embeddings_are_not_trainable(name):
    config = load_presets()[name].config.model_copy(update={"freeze_embeddings": True})
    with torch.device("meta"):
        model = build_model(config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    breakdown = count_parameters(config)
    assert breakdown.trainable == trainable
    assert breakdown.total - breakdown.trainable == config.vocab_size * config.code_embed_dim
