"""`ehrplan schema COMMAND` describes what `COMMAND --json` prints: every command's output
validates against its schema (jsonschema, draft 2020-12); a key a model lacks and a NaN are
refused, never printed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import run_cli, run_without_torch

from ehrplan.cli.app import COMMANDS, load_command, main
from ehrplan.cli.output import SCHEMA_VERSION, document, write_json
from ehrplan.cli.schemas import MODELS, json_schema

PLANNER_RUNS = [
    ["presets"],
    ["estimate", "--preset", "tiny"],
    ["estimate", "-p", "tiny", "--gpus", "2", "--strategy", "fsdp", "--target", "a10",
     "--patients", "1000"],
    ["estimate", "-p", "tiny-transformer", "--gpus", "2", "--tflops", "100", "--device", "cuda"],
    ["hardware"],
    ["recommend"],
    ["recommend", "--target", "a10", "--gpus", "2"],
    ["recommend", "--target", "m1-16gb", "--type", "lstm"],
    ["validate", "tiny", "presets/large-lstm.toml", "--budget", "16GiB"],
    ["validate", "tiny", "--target", "a100-40gb", "--gpus", "2", "--strategy", "fsdp"],
]  # fmt: skip


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    try:
        main([*args, "--json"])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    assert code in (0, 1), out.err
    return code, json.loads(out.out)


def _check(doc: dict[str, Any]) -> None:
    schema = json_schema(doc["command"])
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(doc)


def _json_commands() -> set[str]:
    """Every command of the app that takes --json, by the name its document carries."""
    names = set()
    for name in COMMANDS:
        cmd = load_command(name)
        for sub_name, sub in (getattr(cmd, "commands", None) or {name: cmd}).items():
            if any(p.name == "json_" for p in sub.params):
                names.add(name if sub is cmd else f"{name} {sub_name}")
    return names


def test_every_json_command_has_a_model() -> None:
    assert _json_commands() == set(MODELS)


@pytest.mark.parametrize("args", PLANNER_RUNS, ids=lambda a: " ".join(a))
def test_planner_outputs_validate_against_their_schema(capsys, args: list[str]) -> None:
    _, doc = _run(capsys, *args)
    assert doc["command"] == args[0] and doc["schema_version"] == SCHEMA_VERSION
    _check(doc)


def test_schema_validate_validates_validate_json(tmp_path: Path) -> None:
    """The CLI's own answer, as CI would use it: `ehrplan schema validate` > file."""
    schema = run_cli("schema", "validate")
    assert schema.returncode == 0, schema.stderr
    fits = run_cli("validate", "tiny", "--budget", "1GiB", "--json")
    short = run_cli("validate", "tiny", "presets/large-lstm.toml", "--budget", "16GiB", "--json")
    assert (fits.returncode, short.returncode) == (0, 1)
    validator = jsonschema.Draft202012Validator(json.loads(schema.stdout))
    for out in (fits, short):
        validator.validate(json.loads(out.stdout))
    broken = json.loads(short.stdout) | {"surprise": 1}
    assert not validator.is_valid(broken)  # additionalProperties: false
    del broken["surprise"], broken["ok"]
    assert not validator.is_valid(broken)


def test_schema_command_lists_and_refuses(capsys) -> None:
    main_code = _exit(lambda: main(["schema"]))
    assert main_code == 0
    assert capsys.readouterr().out.split("\n")[:-1] == list(MODELS)
    assert _exit(lambda: main(["schema", "data", "stats"])) == 0
    assert json.loads(capsys.readouterr().out)["properties"]["command"]["const"] == "data stats"
    assert _exit(lambda: main(["schema", "nope"])) == 2
    err = capsys.readouterr().err.strip()
    assert "nope" in err and "validate" in err and "\n" not in err


def _exit(f: Any) -> int:
    try:
        f()
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _validate_payload() -> dict[str, Any]:
    from ehrplan.plan.config import get_preset
    from ehrplan.plan.planner import budget_from_size, fit
    from ehrplan.plan.units import parse_size

    b = budget_from_size(parse_size("16GiB"))
    f = fit(get_preset("tiny").config, b, "tiny")
    return {"budget": b.as_dict(), "results": [f.as_dict()], "ok": True, "estimate_notes": []}


def test_a_key_the_model_lacks_is_refused_in_one_line() -> None:
    payload = _validate_payload()
    assert document("validate", payload)["results"][0]["name"] == "tiny"
    payload["results"][0]["new_field"] = 1
    with pytest.raises(RuntimeError) as e:
        document("validate", payload)
    assert "results.0.new_field" in str(e.value) and "\n" not in str(e.value)


def test_non_finite_numbers_never_reach_the_json() -> None:
    payload = _validate_payload()
    payload["budget"]["headroom"] = math.nan
    with pytest.raises(RuntimeError, match=r"budget\.headroom"):
        document("validate", payload)
    with pytest.raises(ValueError):
        write_json({"x": math.inf})


def test_an_undefined_metric_is_null() -> None:
    from ehrplan.cli.schemas.runs import HeldOutBrief

    m = HeldOutBrief.model_validate(
        dict.fromkeys(HeldOutBrief.model_fields, 0.5) | {"c_index": math.nan}
    )
    assert m.c_index is None and m.loss == 0.5


@pytest.mark.slow
def test_torch_command_outputs_validate_against_their_schema(capsys, tmp_path: Path) -> None:
    data, run = tmp_path / "ckd", tmp_path / "run"
    steps = ["--max-steps", "2", "--eval-every", "2", "--threads", "1"]
    runs = [
        ["synth", "--patients", "60", "--out", str(data)],
        ["data", "stats", str(data), "--preset", "tiny"],
        ["data", "prepare", str(data)],
        ["dry-run", "--preset", "tiny", "--device", "cpu"],
        ["train", "--preset", "tiny", "--data", str(data), "--out", str(run), *steps],
        ["export-embeddings", str(run), "--out", str(tmp_path / "emb.safetensors")],
        # a real run folder read back as a config: validate RUN_DIR, --config its config.json
        ["validate", str(run), "--budget", "1GiB"],
        ["estimate", "--config", str(run / "config.json")],
        ["compare", "--data", str(data), "--out", str(tmp_path / "cmp"), *steps],
    ]
    for args in runs:
        capsys.readouterr()
        code = _exit(lambda a=args: main([*a, "--json"]))
        out = capsys.readouterr()
        assert code == 0, out.err
        doc = json.loads(out.out)
        assert doc["command"] == " ".join(args[:2] if args[0] == "data" else args[:1])
        _check(doc)


def test_schema_never_imports_torch() -> None:
    code, out, err = run_without_torch(["schema", "estimate"])
    assert code == 0, err
    assert json.loads(out)["properties"]["command"]["const"] == "estimate"
