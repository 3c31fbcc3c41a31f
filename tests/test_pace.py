"""Time is part of the answer: the rate, the time rule of `recommend` and `train --auto`, the
units, and the table at 80 columns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ehrplan.cli.app import main
from ehrplan.errors import UsageError
from ehrplan.plan import hardware, pace
from ehrplan.plan.config import load_presets
from ehrplan.plan.hardware import Sources, probe
from ehrplan.plan.planner import budget_from_probe, budget_from_target, plan
from tests.test_hardware import FIXTURES

REPO = Path(__file__).resolve().parents[1]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    code = exc.value.code
    return (code if isinstance(code, int) else 0 if code is None else 1), out, err


@pytest.mark.parametrize("seconds", [0.004, 0.5, 3.2, 42.0, 61.0, 3599.0, 3600.0, 53_418.4, 9e6])
def test_durations_are_human(seconds: float) -> None:
    text = pace.fmt_duration(seconds)
    assert "e+" not in text and "e-" not in text
    unit = "h" if seconds >= 3600 else "min" if seconds >= 60 else "s"
    assert unit in text.split()


@pytest.mark.parametrize(
    "argv",
    [
        ["recommend", "--max-epoch-hours", "0"],
        ["recommend", "--max-epoch-hours", "-2"],
        ["recommend", "--max-epoch-hours", "nan"],
        ["recommend", "--max-epoch-hours", "inf"],
        ["recommend", "--patients", "0"],
        ["estimate", "--preset", "tiny", "--target", "a10", "--patients", "-5"],
        ["estimate", "--preset", "tiny", "--tflops", "nan"],
    ],
)
def test_bad_time_input_is_one_line_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err


def test_m1_for_100k_patients_in_2_hours(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["recommend", "--target", "m1-16gb", "--patients", "100000", "--max-epoch-hours", "2"]
    code, out, _ = run([*argv, "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["budget"]["time_rule"] == {"patients": 100000, "max_epoch_hours": 2}
    slow = [x for xs in doc["excluded_by_time"].values() for x in xs]
    assert slow, "a 2.6 TFLOPS GPU trains some preset slower than 2 h per epoch"
    code, text, _ = run(argv, capsys)
    for x in slow:
        assert x["seconds_per_epoch"] > 2 * 3600 and " h" in x["epoch"]
        assert f"{x['preset']} ({x['epoch']} per epoch)" in text  # named as excluded by time
    for t, rec in doc["recommendation"].items():
        assert rec["time"]["seconds_per_epoch"] <= 2 * 3600 and rec["reason"] in text
        names = [r["preset"] for r in doc["presets"] if r["model_type"] == t]
        larger = names[names.index(rec["preset"]) + 1 :]
        fits = [r for r in doc["presets"] if r["preset"] in larger and r["fits"]]
        assert all(r["time"]["seconds_per_epoch"] > 2 * 3600 for r in fits)


def test_estimate_target_time_equals_recommend(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(["recommend", "--target", "a10", "--patients", "5000", "--json"], capsys)
    row = next(r for r in json.loads(out)["presets"] if r["preset"] == "medium-lstm")
    argv = ["estimate", "--preset", "medium-lstm", "--target", "a10", "--patients", "5000"]
    _, out, _ = run([*argv, "--json"], capsys)
    t = json.loads(out)["time"]
    assert (t["seconds_per_epoch"], t["epoch"]) == (
        row["time"]["seconds_per_epoch"],
        row["time"]["epoch"],
    )


def _fake_probe() -> hardware.HardwareReport:
    return probe(Sources(root=FIXTURES / "no-gpu" / "root", nvml=object()))


def test_a_recorded_pace_is_used_for_its_preset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EHRPLAN_CACHE", str(tmp_path))
    budget = budget_from_probe(_fake_probe(), headroom=0.1)
    before = {r["preset"]: r["time"] for r in plan(budget, ["lstm"])["presets"]}
    assert not before["small-lstm"]["rate_measured"]
    assert not pace.record(budget.device_key or "", "small-lstm", "fp32", 100.0, "runs/x", 5)
    precision = next(
        r["precision"] for r in plan(budget, ["lstm"])["presets"] if r["preset"] == "small-lstm"
    )
    assert pace.record(budget.device_key or "", "small-lstm", precision, 100.0, "runs/x", 50)
    after = {r["preset"]: r["time"] for r in plan(budget, ["lstm"])["presets"]}
    t = after["small-lstm"]
    assert t["rate_measured"] and "runs/x" in t["throughput_source"]
    # the run's own pace: an epoch of N patients at 100 patients/s
    assert t["seconds_per_epoch"] == pytest.approx(
        t["steps_per_epoch"] * load_presets()["small-lstm"].config.effective_batch_size / 100.0
    )
    assert after["medium-lstm"] == before["medium-lstm"]  # other presets keep their rate


def test_recommend_and_train_auto_choose_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same machine, same preset, same words (train --auto's choice without the training)."""
    from ehrplan.runtime.training import choose

    monkeypatch.setenv("EHRPLAN_CACHE", str(tmp_path))
    report = _fake_probe()
    monkeypatch.setattr(hardware, "probe", lambda *a, **k: report)
    for t in ("lstm", "transformer"):
        _, out, _ = run(["recommend", "--type", t, "--json"], capsys)
        rec = json.loads(out)["recommendation"][t]
        choice = choose.auto_choice(t, "cpu")
        assert choice.preset == rec["preset"]
        assert f"recommend: {rec['reason']}" in choice.reasons


def test_recommend_table_at_80_columns_keeps_preset_names_whole() -> None:
    env = {**os.environ, "COLUMNS": "80"}
    for argv in (["recommend"], ["recommend", "--target", "m1-16gb"]):
        out = subprocess.run(
            [sys.executable, "-m", "ehrplan", *argv],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        table = [line for line in out.stdout.splitlines() if line[:1] in "┏┃┡│└"]
        assert table and all(len(line) <= 80 for line in table)
        cells = {c.strip().removesuffix(" *") for line in table for c in line.split("│")}
        assert set(load_presets()) <= cells


def test_no_throughput_known_means_no_time_rule() -> None:
    p = plan(budget_from_target("m3-16gb"))  # Apple publishes no TFLOPS for the M3
    assert all(r["time"] is None for r in p["presets"])
    assert p["excluded_by_time"] == {"lstm": [], "transformer": []}
    assert "time not checked" in p["recommendation"]["lstm"]["reason"]


def test_bad_rule_values_raise() -> None:
    for patients, hours in [(0, 1.0), (10, 0.0), (10, float("nan"))]:
        with pytest.raises(UsageError):
            pace.check_time_rule(patients, hours)


def test_the_fastest_run_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EHRPLAN_CACHE", str(tmp_path))
    for pps in (100.0, 40.0):  # the slower run met a loaded machine
        assert pace.record("cpu x", "small-lstm", "fp32", pps, "runs/a", 50)
    rate = pace.measured("cpu x", "small-lstm", "fp32", 1e9)
    assert rate is not None and rate.peak_tflops == pytest.approx(100.0 * 1e9 / 1e12)
    assert "fastest of 2 run(s)" in rate.source
    assert pace.record("cpu x", "small-lstm", "fp32", 150.0, "runs/b", 50)
    rate = pace.measured("cpu x", "small-lstm", "fp32", 1e9)
    assert rate is not None and "runs/b" in rate.source
    assert pace.measured("cpu x", "small-lstm", "bf16", 1e9) is None


def test_data_counts_its_training_patients(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    from ehrplan.data import meds

    splits = ["train"] * 7 + ["tuning", "held_out"]
    meds.write_parquet(
        meds.splits_table(np.arange(len(splits), dtype=np.int64), splits),
        tmp_path / meds.SPLITS_FILE,
    )
    code, out, _ = run(["recommend", "--data", str(tmp_path), "--type", "lstm", "--json"], capsys)
    assert code == 0 and json.loads(out)["budget"]["time_rule"]["patients"] == 7
    code, _, err = run(["recommend", "--data", str(tmp_path / "nope")], capsys)
    assert code == 2 and "no such directory" in err
    argv = ["recommend", "--data", str(tmp_path), "--patients", "5"]
    assert run(argv, capsys)[0] == 2


def test_a_local_gpu_the_catalog_names_gets_its_peaks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_hardware import load

    monkeypatch.setenv("EHRPLAN_CACHE", str(tmp_path))
    src, _ = load("a100x4-visible-2-3")
    report = probe(src)
    gpu = report.nvidia[0]
    unknown = budget_from_probe(report.model_copy(update={"nvidia": [gpu]}))
    assert all(r["time"] is None for r in plan(unknown, ["lstm"])["presets"])  # not in catalog
    a10 = report.model_copy(update={"nvidia": [gpu.model_copy(update={"name": "NVIDIA A10"})]})
    rows = plan(budget_from_probe(a10), ["lstm"])["presets"]
    assert all(r["time"] and "125 TFLOPS" in r["time"]["throughput_source"] for r in rows[1:])
