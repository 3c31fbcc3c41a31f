"""`ehrplan hardware`, `recommend` and `validate` from the command line: exit codes, JSON, and
no torch import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ehrplan.cli.app import main
from ehrplan.plan.config import get_preset, load_config_file, validate_config
from ehrplan.plan.estimator import estimate_memory
from ehrplan.plan.levels import process_fit_bytes
from ehrplan.plan.planner import budget_from_size, budget_from_target, precision_for
from ehrplan.plan.units import parse_size

REPO = Path(__file__).resolve().parents[1]
LARGE_TRANSFORMER = str(REPO / "presets" / "large-transformer.toml")


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the console entry point in-process; (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    code = exc.value.code
    return (code if isinstance(code, int) else 0 if code is None else 1), out, err


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    code, out, _ = run([*argv, "--json"], capsys)
    return code, json.loads(out)


# --------------------------------------------------------------------------------------------
# hardware


def test_hardware_json_on_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = run_json(["hardware"], capsys)
    assert code == 0 and doc["command"] == "hardware"
    host = doc["hardware"]["host"]
    assert isinstance(host["total_bytes"], int) and host["total_bytes"] > 0
    cpu = next(b for b in doc["budgets"] if b["device"] == "cpu")
    limit = host["cgroup_limit_bytes"]
    total = min(host["total_bytes"], limit) if limit else host["total_bytes"]
    # the one host budget: what the OS can give now, within the total (`host_budget`)
    assert cpu["usable_bytes"] == (host["available_bytes"] or total) <= total
    assert cpu["budget_bytes"] == int(cpu["usable_bytes"] * (1 - doc["headroom"]))
    assert "ehrplan" in doc["bug_report"] and "not imported" in doc["bug_report"]
    for g in doc["hardware"]["nvidia"]:  # none on the CPU runner; checked where there are
        assert g["usable_bytes"] <= g["total_bytes"] - g["reserved_bytes"]


def test_hardware_human_output(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["hardware"], capsys)
    assert code == 0 and "Budget per device" in out and "```" in out
    assert "Traceback" not in out + err


# --------------------------------------------------------------------------------------------
# recommend


@pytest.mark.parametrize("target", ["m1-16gb", "a10", "a100-40gb"])
def test_recommend_target_json_matches_the_estimator(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = run_json(["recommend", "--target", target], capsys)
    assert code == 0
    budget = budget_from_target(target)
    assert doc["budget"]["budget_bytes"] == budget.budget_bytes
    for row in doc["presets"]:
        cfg = get_preset(row["preset"]).config
        precision = precision_for(cfg, budget).precision
        est = estimate_memory(cfg, precision=precision, device=budget.device)
        # fit is decided on the process level (ehrplan.plan.levels)
        need, label, _ = process_fit_bytes(budget.device, est.total_bytes, est.lstm_gate_bytes)
        assert need > est.total_bytes
        assert (row["precision"], row["estimate_bytes"]) == (precision, need)
        assert row["estimate_notes"] == [*est.notes, f"process level; {label}"]
    for t in ("lstm", "transformer"):
        rec = doc["recommendation"][t]
        assert rec is not None and rec["estimate_bytes"] <= budget.budget_bytes
        typed = [r for r in doc["presets"] if r["model_type"] == t]
        slow = {x["preset"] for x in doc["excluded_by_time"][t]}
        ok = [
            r["preset"]
            for r in typed
            if (r["fits"] or r["fits_after_change"]) and r["preset"] not in slow
        ]
        assert rec["preset"] == ok[-1]
        assert doc["seed_check"][t]["statement"]


def test_recommend_human_output_shows_the_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    from ehrplan.plan.units import fmt_bytes

    _, doc = run_json(["recommend", "--target", "a10"], capsys)
    code, out, _ = run(["recommend", "--target", "a10"], capsys)
    assert code == 0
    for t in ("lstm", "transformer"):
        rec = doc["recommendation"][t]
        assert f"recommended {rec['preset']}" in out
        assert fmt_bytes(rec["estimate_bytes"]) in out
        assert doc["seed_check"][t]["statement"] in out
    # the estimator's caveat for the device travels with the answer
    assert doc["estimate_notes"] and any("CUDA path unmeasured" in n for n in doc["estimate_notes"])
    assert all(n in out for n in doc["estimate_notes"])


def test_recommend_memory_says_which_unit(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = run_json(["recommend", "--memory", "24g", "--type", "lstm"], capsys)
    assert code == 0 and doc["budget"]["usable_bytes"] == 24 * 2**30
    assert any("24 GiB" in n and "binary" in n for n in doc["budget"]["notes"])
    assert {r["model_type"] for r in doc["presets"]} == {"lstm"}


def test_recommend_on_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = run_json(["recommend", "--type", "lstm"], capsys)
    assert code == 0 and doc["budget"]["source"] == "probe"


@pytest.mark.parametrize(
    "argv",
    [
        ["recommend", "--target", "a10", "--memory", "24GB"],
        ["recommend", "--target", "nope"],
        ["recommend", "--memory", "24 parsecs"],
        ["recommend", "--target", "a10", "--headroom", "1.5"],
        ["recommend", "--type", "cnn"],
        ["recommend", "--target", "a10", "--device", "cpu"],
    ],
)
def test_recommend_bad_input_exits_2_with_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")


# --------------------------------------------------------------------------------------------
# validate


def _expect_fits(path: str, budget_text: str) -> tuple[bool, int, int]:
    cfg = validate_config(load_config_file(path))
    budget = budget_from_size(parse_size(budget_text))
    est = estimate_memory(cfg, precision=precision_for(cfg, budget).precision, device="cuda")
    need = process_fit_bytes("cuda", est.total_bytes, est.lstm_gate_bytes)[0]
    return need <= budget.budget_bytes, need, budget.budget_bytes


@pytest.mark.parametrize("budget", ["16GiB", "80GiB", "1GiB"])
def test_validate_exit_code_follows_the_estimator(
    budget: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fits, est, limit = _expect_fits(LARGE_TRANSFORMER, budget)
    code, _, err = run(["validate", LARGE_TRANSFORMER, "--budget", budget], capsys)
    assert code == (0 if fits else 1)
    if not fits:
        assert "large-transformer.toml does not fit" in err and "short by" in err
        assert len(err.strip().splitlines()) == 1
    code, doc = run_json(["validate", LARGE_TRANSFORMER, "--budget", budget], capsys)
    assert doc["ok"] is fits and code == (0 if fits else 1)
    r = doc["results"][0]
    assert (r["estimate_bytes"], r["budget_bytes"]) == (est, limit)
    assert r["shortfall_bytes"] == max(est - limit, 0)


LARGE_LSTM = str(REPO / "presets" / "large-lstm.toml")


def test_validate_real_command_with_the_full_estimator(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The issue expected large-transformer to miss 16 GiB; the full estimator puts it at a few
    # GiB (flash attention, batch 32 x 100 visits), so the preset that misses 16 GiB is
    # large-lstm (tens of GiB: the within-visit LSTM saves batch x visits x codes steps).
    code, _, err = run(["validate", LARGE_LSTM, "--budget", "16GiB"], capsys)
    assert code == 1 and "large-lstm.toml does not fit" in err and "short by" in err
    code, _, _ = run(["validate", LARGE_LSTM, LARGE_TRANSFORMER, "--budget", "80GiB"], capsys)
    assert code == 0


def test_validate_several_and_target(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = run_json(["validate", "tiny-lstm", "small-lstm", "--target", "a100-40gb"], capsys)
    assert (
        code == 0
        and doc["ok"]
        and [r["name"] for r in doc["results"]]
        == [
            "tiny-lstm",
            "small-lstm",
        ]
    )
    assert doc["budget"]["device"] == "cuda"


def test_validate_any_failing_exits_1_naming_only_it(capsys: pytest.CaptureFixture[str]) -> None:
    budget = budget_from_size(parse_size("64MiB"))
    tiny = get_preset("tiny-lstm").config
    tiny_fits = estimate_memory(tiny, precision="fp32", device="cuda").total_bytes <= (
        budget.budget_bytes
    )
    assert _expect_fits(LARGE_TRANSFORMER, "64MiB")[0] is False
    code, _, err = run(["validate", "tiny-lstm", LARGE_TRANSFORMER, "--budget", "64MiB"], capsys)
    assert code == 1 and "large-transformer.toml does not fit" in err
    assert ("tiny-lstm does not fit" in err) is not tiny_fits


def test_validate_malformed_file_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("hidden_dim = [\n")
    code, out, err = run(["validate", str(bad), "--budget", "80GiB"], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "malformed TOML" in err
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("hiden_dim = 3\n")
    code, _, err = run(["validate", str(unknown), "small-lstm", "--budget", "80GiB"], capsys)
    assert code == 2 and "unknown field 'hiden_dim'" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["validate", "small-lstm"],
        ["validate", "small-lstm", "--budget", "8GB", "--target", "a10"],
        ["validate", "no-such-preset", "--budget", "8GB"],
        ["validate", "missing.toml", "--budget", "8GB"],
        ["validate", "small-lstm", "--budget", "eight"],
    ],
)
def test_validate_bad_input_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(argv, capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# no torch


def test_hardware_recommend_validate_do_not_import_torch(tmp_path: Path) -> None:
    script = f"""
import sys
from ehrplan.cli.app import main
runs = [
    ["hardware", "--json"],
    ["recommend", "--json"],
    ["recommend", "--target", "a10", "--json"],
    ["validate", {LARGE_TRANSFORMER!r}, "small-lstm", "--budget", "16GiB", "--json"],
    ["validate", {LARGE_TRANSFORMER!r}, "--budget", "1MiB"],
]
for argv in runs:
    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, 1, None), (argv, e.code)
print("TORCH_IMPORTED" if "torch" in sys.modules else "NO_TORCH", file=sys.stderr)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().endswith("NO_TORCH"), proc.stderr[-2000:]


@pytest.mark.parametrize(
    "machine", ["a100x4-visible-2-3", "a100-mig-slice", "m1-16gb", "m1-rosetta"]
)
def test_hardware_renders_recorded_machines(
    machine: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_hardware import load

    import ehrplan.cli.hardware as cmd
    from ehrplan.plan.hardware import probe

    src, m = load(machine)
    monkeypatch.setattr(cmd, "probe", lambda mps_reader=None: probe(src))
    code, out, err = run(["hardware"], capsys)
    assert code == 0 and "Traceback" not in out + err
    code, doc = run_json(["hardware"], capsys)
    devices = [b["device"].split(":")[0] for b in doc["budgets"]]
    assert m["expect"]["device"] in devices
    if m["expect"]["device"] == "cuda":
        assert "cuda:0" in out and "NVIDIA" in out
    if m["expect"].get("rosetta"):
        assert "Rosetta" in out
