"""Config model, presets as data, and the precedence flag > file > preset > defaults."""

from __future__ import annotations

import ast
import re

import pytest
from conftest import SHARED
from pydantic import ValidationError

from ehrplan.errors import ConfigError, UsageError
from ehrplan.plan.config import (
    EHRModelConfig,
    get_model_config,
    get_preset,
    load_presets,
    preset_names,
    resolve_config,
)

SEED = SHARED / "seed" / "resource-aware-model-configs.md"


def test_every_field_is_described():
    for name, field in EHRModelConfig.model_fields.items():
        assert field.description, f"field {name} has no description"


def test_config_is_frozen_and_forbids_unknown_keys():
    c = EHRModelConfig()
    with pytest.raises(ValidationError, match="frozen"):
        c.hidden_dim = 3  # type: ignore[misc]
    with pytest.raises(ValidationError, match="Extra inputs"):
        EHRModelConfig(hidden_size=3)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"hidden_dim": 0}, "hidden_dim"),
        ({"code_embed_dim": -4}, "code_embed_dim"),
        ({"dropout": 1.0}, "dropout"),
        ({"vocab_size": 1}, "vocab_size"),
        ({"model_type": "gru"}, "model_type"),
        ({"model_type": "transformer"}, "needs num_heads"),
        ({"model_type": "transformer", "num_heads": 5}, "does not divide"),
        ({"num_heads": 4}, "only for model_type='transformer'"),
    ],
)
def test_invalid_configs_raise_one_line(kwargs, fragment):
    with pytest.raises(ConfigError) as err:
        resolve_config(preset="tiny", overrides=kwargs)
    msg = str(err.value)
    assert fragment in msg
    assert "\n" not in msg


def test_presets_load_and_lookup_lists_valid_names():
    names = preset_names()
    for size in ("small", "medium", "large", "tiny"):
        for t in ("lstm", "transformer"):
            assert f"{size}-{t}" in names
    assert get_preset("tiny").name == "tiny-lstm"
    with pytest.raises(ConfigError, match=r"valid presets: .*small-lstm"):
        get_preset("huge-lstm")
    with pytest.raises(ConfigError, match="Valid sizes"):
        get_model_config("huge", "lstm")


def _seed_presets() -> dict[str, dict]:
    """The preset values as written in the seed document's Python code."""
    text = SEED.read_text()
    out = {}
    pattern = r"(\w+)_(LSTM|TRANSFORMER)_CONFIG = EHRModelConfig\((.*?)\n\)"
    for m in re.finditer(pattern, text, re.S):
        call = ast.parse(f"f({m.group(3)}\n)", mode="eval").body
        assert isinstance(call, ast.Call)
        values = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        out[f"{m.group(1).lower()}-{m.group(2).lower()}"] = values
    return out


@pytest.mark.skipif(not SEED.exists(), reason="shared/seed not beside the checkout")
def test_presets_equal_the_seed_exactly():
    seed = _seed_presets()
    assert len(seed) == 6
    for name, values in seed.items():
        config = get_preset(name).config.model_dump()
        for key, value in values.items():
            assert config[key] == value, f"{name}.{key}: {config[key]!r} != seed {value!r}"
        assert get_model_config(*name.split("-")) == get_preset(name).config


def test_precedence_flag_over_file_over_preset_over_defaults(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text("hidden_dim = 40\nbatch_size = 3\n")
    base = get_preset("tiny").config
    # preset over defaults
    c, _ = resolve_config(preset="tiny")
    assert c.hidden_dim == base.hidden_dim != EHRModelConfig().hidden_dim
    # file over preset
    c, _ = resolve_config(preset="tiny", config_file=f)
    assert (c.hidden_dim, c.batch_size, c.num_layers) == (40, 3, base.num_layers)
    # flag over file
    c, _ = resolve_config(preset="tiny", config_file=f, overrides={"hidden_dim": "48"})
    assert (c.hidden_dim, c.batch_size) == (48, 3)
    # a file alone sits on the field defaults
    c, _ = resolve_config(config_file=f)
    assert c.hidden_dim == 40
    assert c.code_embed_dim == EHRModelConfig().code_embed_dim
    # None means "flag not given"
    c, _ = resolve_config(preset="tiny", overrides={"hidden_dim": None})
    assert c.hidden_dim == base.hidden_dim


def test_size_and_type_select_presets_and_conflict_with_preset():
    c, label = resolve_config(size="medium", model_type="transformer")
    assert c == get_preset("medium-transformer").config
    assert "medium-transformer" in label
    with pytest.raises(UsageError):
        resolve_config(preset="tiny", size="small")


def test_malformed_and_missing_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("hidden_dim = = 3\n")
    with pytest.raises(ConfigError, match="malformed TOML"):
        resolve_config(config_file=bad)
    with pytest.raises(ConfigError, match="not found"):
        resolve_config(config_file=tmp_path / "nope.toml")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("hidden_size = 3\n")
    with pytest.raises(ConfigError, match="unknown field 'hidden_size'"):
        resolve_config(config_file=unknown)


def test_seed_api_properties():
    c = get_model_config("small", "lstm")
    assert c.effective_batch_size == 32
    assert c.total_params_millions == pytest.approx(c.total_params / 1e6)
    assert c.memory_estimate_gb(4) > 0
    with pytest.raises(ConfigError):
        c.memory_estimate_gb(3)


def test_every_shipped_preset_file_validates():
    presets = load_presets()
    assert len(presets) == 8
    for p in presets.values():
        assert p.meta.description and p.meta.target
