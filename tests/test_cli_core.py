"""`ehrplan --help`, `presets` and `estimate`: output, JSON schema, errors, and no torch."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, run_cli, run_without_torch

from ehrplan.plan.config import get_preset
from ehrplan.plan.params import count_parameters


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["presets"],
        ["presets", "--json"],
        ["estimate", "--size", "large", "--type", "transformer", "--json"],
        ["estimate", "--preset", "tiny"],
    ],
)
def test_fast_commands_never_import_torch(args):
    code, _, err = run_without_torch(args)
    assert code == 0, err


def test_estimate_json_schema():
    r = run_cli("estimate", "--size", "large", "--type", "transformer", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema_version"] == 1 and doc["command"] == "estimate"
    assert doc["preset"] == "large-transformer"
    assert doc["model_type"] == "transformer"
    config = get_preset("large-transformer").config
    assert doc["params"] == count_parameters(config).total
    assert isinstance(doc["params"], int)
    assert doc["memory"] and all(isinstance(v, int) for v in doc["memory"].values())
    assert doc["total_bytes"] == sum(doc["memory"].values())
    assert doc["memory"]["parameters"] == 4 * doc["params"]


def test_estimate_table_is_readable():
    r = run_cli("estimate", "--size", "large", "--type", "transformer")
    assert r.returncode == 0, r.stderr
    assert "92,247,046" in r.stdout
    assert "optimizer" in r.stdout


def test_overrides_reach_the_estimate():
    r = run_cli("estimate", "--preset", "tiny", "--set", "hidden_dim=64", "--json")
    base = run_cli("estimate", "--preset", "tiny", "--json")
    assert json.loads(r.stdout)["params"] > json.loads(base.stdout)["params"]
    assert json.loads(r.stdout)["config"]["hidden_dim"] == 64


def test_presets_json_lists_every_preset_with_exact_counts():
    doc = json.loads(run_cli("presets", "--json").stdout)
    names = {p["name"]: p for p in doc["presets"]}
    assert len(names) == 8
    assert names["large-lstm"]["params"] == count_parameters(get_preset("large-lstm").config).total


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["estimate", "--preset", "nope"], "unknown preset 'nope'"),
        (["estimate", "--set", "hidden_size=3"], "unknown field 'hidden_size'"),
        (["estimate", "--set", "hidden_dim=-1"], "hidden_dim"),
        (["estimate", "--set", "hidden_dim=0"], "hidden_dim"),
        (["estimate", "--size", "tiny", "--type", "transformer", "--set", "num_heads=5"], "divide"),
        (["estimate", "--config", "/no/such/file.toml"], "not found"),
        (["estimate", "--preset", "tiny", "--size", "small"], "either --preset"),
        (["estimate", "--set", "novalue"], "KEY=VALUE"),
        (["estimate", "--precision", "fp8"], "unknown precision"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, fragment):
    r = run_cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_malformed_toml_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[oops\n")
    r = run_cli("estimate", "--config", str(bad))
    assert r.returncode == 2
    assert "malformed TOML" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_unknown_option_exits_2_without_traceback():
    r = run_cli("estimate", "--bogus")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr


def test_readme_preset_table_is_the_command_output():
    r = run_cli("presets", "--markdown")
    assert r.returncode == 0
    assert r.stdout.strip() in (REPO / "README.md").read_text()
