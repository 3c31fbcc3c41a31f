"""Calibration profiles and the three levels of peak: the fit on synthetic and recorded
measurements with known terms, profile loading and its bad input, and what `estimate` says."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import run_cli

from ehrplan.errors import ConfigError, DoesNotFitError
from ehrplan.plan.calibration import (
    CalibrationProfile,
    DeviceTerms,
    load_profile,
    parse_profile,
    resolve_calibration,
)
from ehrplan.plan.config import get_preset
from ehrplan.plan.estimator import estimate_memory
from ehrplan.plan.levels import levels_for, memory_levels

KNOWN = DeviceTerms(
    lstm_scratch_per_gate_byte=0.8,
    transformer_scratch_ratio=0.03,
    runtime_baseline_bytes=150 * 2**20,
    allocator_retention=1.2,
    cuda_context_bytes=420 * 2**20,
    cuda_reserve_ratio=1.25,
)


def _synthetic_rows(device: str, terms: DeviceTerms) -> list:
    """Ladder rows whose measurements follow ``terms`` exactly (live = the analytic estimate)."""
    from ehrplan.runtime.calibrate import LadderRow, ladder_configs

    rows = []
    for name, cfg in ladder_configs().items():
        est = estimate_memory(cfg, device=device)
        lv = levels_for(device, est.total_bytes, est.lstm_gate_bytes, terms)
        reserved = None
        if device == "cuda":
            reserved = int(lv.allocator_peak_bytes * terms.cuda_reserve_ratio)
        rows.append(
            LadderRow(
                name=name,
                model_type=cfg.model_type,
                batch=cfg.batch_size,
                visits=cfg.max_visits,
                codes=cfg.max_codes_per_visit,
                live_bytes=est.total_bytes,
                allocator_peak_bytes=lv.allocator_peak_bytes,
                process_peak_bytes=lv.process_peak_bytes,
                reserved_bytes=reserved,
                estimated_bytes=est.total_bytes,
                lstm_gate_bytes=est.lstm_gate_bytes,
                step_seconds=0.1,
                flops_per_step=1,
            )
        )
    return rows


@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
def test_the_fit_recovers_known_terms_from_synthetic_measurements(device):
    from ehrplan.runtime.calibrate import fit_terms, residuals

    terms = KNOWN if device != "mps" else replace(KNOWN, allocator_retention=1.0)
    rows = _synthetic_rows(device, terms)
    fitted, names = fit_terms(device, rows)
    assert fitted.lstm_scratch_per_gate_byte == pytest.approx(0.8, rel=1e-3)
    assert fitted.transformer_scratch_ratio == pytest.approx(0.03, rel=1e-3)
    if device == "cuda":
        assert fitted.cuda_reserve_ratio == pytest.approx(1.25, rel=1e-3)
        assert fitted.cuda_context_bytes == pytest.approx(420 * 2**20, rel=1e-3)
        assert "cuda_context_bytes" in names
    else:
        assert fitted.runtime_baseline_bytes == pytest.approx(150 * 2**20, rel=1e-3)
        assert fitted.allocator_retention == pytest.approx(terms.allocator_retention, rel=1e-3)
    worst = max(abs(v) for r in residuals(device, rows, fitted).values() for v in r.values())
    assert worst < 1e-3


#: Recorded from a CUDA measurement's fields (max_memory_allocated, max_memory_reserved, the
#: context): reserved = 1.2 x allocated rounded to 2 MiB blocks, context 312 MiB.
RECORDED_CUDA = {
    "lstm-tiny-b8": (2_621_440, 4_194_304),
    "lstm-e32-b8": (18_874_368, 23_068_672),
    "lstm-e64-b16": (96_468_992, 115_343_360),
    "transformer-tiny-b8": (1_048_576, 2_097_152),
    "transformer-d128-b16": (52_428_800, 62_914_560),
    "transformer-d256-b16": (125_829_120, 150_994_944),
}


def test_cuda_ladder_on_recorded_measurements_fits_reserve_and_context():
    from ehrplan.runtime.calibrate import fit_terms, run_ladder

    context = 312 * 2**20

    def fake_measure(cfg, device, timeout):  # what measure_in_subprocess returns on CUDA
        name = next(n for n, c in _ladder().items() if c == cfg)
        allocated, reserved = RECORDED_CUDA[name]
        return SimpleNamespace(
            measured_peak_bytes=allocated,
            allocator_peak_bytes=allocated,
            process_peak_bytes=reserved + context,
            peak_reserved_bytes=reserved,
            step_seconds=0.01,
        )

    rows, skipped = run_ladder("cuda", measure=fake_measure)
    assert not skipped and len(rows) == len(RECORDED_CUDA)
    terms, _ = fit_terms("cuda", rows)
    assert 1.15 < terms.cuda_reserve_ratio < 1.30
    assert terms.cuda_context_bytes == context


def _ladder():
    from ehrplan.runtime.calibrate import ladder_configs

    return ladder_configs()


def test_a_ladder_step_that_runs_out_of_memory_is_skipped_and_reported():
    from ehrplan.runtime.calibrate import run_ladder

    def fake_measure(cfg, device, timeout):
        if cfg.max_visits == 128:
            raise DoesNotFitError("batch 16 of this model on cpu does not fit: out of memory")
        return SimpleNamespace(
            measured_peak_bytes=1000,
            allocator_peak_bytes=1100,
            process_peak_bytes=10**8,
            peak_reserved_bytes=None,
            step_seconds=0.01,
        )

    rows, skipped = run_ladder("cpu", measure=fake_measure)
    assert {s["name"] for s in skipped} == {"transformer-d128-b16", "transformer-d256-b16"}
    assert all("out of memory" in s["reason"] for s in skipped)
    assert len(rows) == len(_ladder()) - 2


def _profile(device: str = "cpu", torch_version: str = "2.13.0+cpu") -> CalibrationProfile:
    return CalibrationProfile(
        device=device,
        device_name="Test CPU",
        driver="Linux",
        torch_version=torch_version,
        date="2026-11-30T18:00:00+00:00",
        terms=replace(DeviceTerms(), runtime_baseline_bytes=300 * 2**20),
        fitted=["runtime_baseline_bytes"],
    )


def test_a_profile_round_trips_and_bad_ones_name_their_file(tmp_path: Path):
    good = tmp_path / "cpu.json"
    good.write_text(json.dumps(_profile().to_json()))
    assert load_profile(good, "cpu").terms.runtime_baseline_bytes == 300 * 2**20
    doc = _profile().to_json()
    cases = {
        "malformed.json": "{not json",
        "foreign.json": json.dumps({"format": "something-else"}),
        "version.json": json.dumps({**doc, "format_version": 99}),
        "terms.json": json.dumps({**doc, "terms": {"no_such_term": 1}}),
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=name):
            load_profile(tmp_path / name, "cpu")
    with pytest.raises(ConfigError, match="not for 'cpu'"):
        parse_profile(_profile("cuda").to_json(), "gpu.json", "cpu")


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "EHRPLAN_CACHE": str(cache)}


def test_estimate_says_uncalibrated_then_uses_the_cached_profile(tmp_path: Path):
    out = run_cli("estimate", "--preset", "small-lstm", "--json", env=_env(tmp_path))
    assert out.returncode == 0, out.stderr
    before = json.loads(out.stdout)
    assert before["calibration"] is None
    assert any(n.startswith("uncalibrated:") for n in before["notes"])
    assert before["total_bytes"] < before["allocator_peak_bytes"] < before["process_peak_bytes"]

    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "cpu.json").write_text(json.dumps(_profile().to_json()))
    after = json.loads(
        run_cli("estimate", "--preset", "small-lstm", "--json", env=_env(tmp_path)).stdout
    )
    assert after["calibration"]["device"] == "cpu"
    assert after["calibration"]["date"].startswith("2026-11-30")
    assert any(n.startswith("calibrated on Test CPU") for n in after["notes"])
    gained = 300 * 2**20 - DeviceTerms().runtime_baseline_bytes  # the profile's baseline
    assert after["process_peak_bytes"] - before["process_peak_bytes"] == gained
    assert after["total_bytes"] == before["total_bytes"]


def test_a_bad_profile_is_exit_2_when_passed_and_a_warning_when_cached(tmp_path: Path):
    bad = tmp_path / "calibration" / "cpu.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps({**_profile().to_json(), "format_version": 7}))
    out = run_cli("estimate", "-p", "tiny", "--calibration", str(bad), env=_env(tmp_path))
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and str(bad) in out.stderr
    cached = run_cli("estimate", "-p", "tiny", "--json", env=_env(tmp_path))
    assert cached.returncode == 0
    assert json.loads(cached.stdout)["calibration"] is None
    assert "ignoring" in cached.stderr and str(bad) in cached.stderr


def test_another_torch_version_warns(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("EHRPLAN_CACHE", str(tmp_path))
    path = tmp_path / "calibration" / "cpu.json"
    path.parent.mkdir()
    path.write_text(json.dumps(_profile(torch_version="2.99.0").to_json()))
    cal = resolve_calibration("cpu")
    assert cal.profile is not None
    assert any("2.99.0" in w for w in cal.warnings)
    monkeypatch.setattr("ehrplan.plan.calibration.installed_torch", lambda: "2.14.1")
    path.unlink()
    assert any("fitted on torch 2.13.0" in w for w in resolve_calibration("cpu").warnings)


def test_cuda_process_level_adds_reserve_and_context_the_budget_has_not_excluded():
    est = estimate_memory(get_preset("small-transformer").config, device="cuda")
    lv = memory_levels(est, KNOWN)
    assert lv.process_peak_bytes == int(lv.allocator_peak_bytes * 1.25) + 420 * 2**20 or (
        abs(lv.process_peak_bytes - lv.allocator_peak_bytes * 1.25 - 420 * 2**20) <= 1
    )
    # a GPU budget already deducted its 512 MiB context allowance, up to the modelled context
    assert lv.fit_bytes == lv.process_peak_bytes - min(512, 420) * 2**20
    assert lv.fit_bytes > lv.allocator_peak_bytes


def test_calibrate_on_a_device_that_is_not_here_is_one_line_exit_2():
    out = run_cli("calibrate", "--device", "cuda")
    if out.returncode == 0:
        pytest.skip("a GPU is present")
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "cuda" in out.stderr


def test_allocator_settings_are_applied_on_glibc():
    from ehrplan.runtime import allocator

    said = allocator.configure()
    assert said.startswith("allocator:")
    allocator.trim()


@pytest.mark.slow
def test_calibrate_cpu_writes_a_profile_the_estimate_then_uses(tmp_path: Path):
    profile = tmp_path / "cpu.json"
    out = run_cli(
        "calibrate", "--device", "cpu", "--budget-seconds", "10", "--out", str(profile),
        "--json", env=_env(tmp_path),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["ladder"] and doc["ladder"][0]["step_seconds"] > 0
    assert doc["ladder"][0]["flops_per_step"] > 0
    assert load_profile(profile, "cpu").device == "cpu"
    est = run_cli("estimate", "-p", "tiny", "--calibration", str(profile), "--json")
    assert json.loads(est.stdout)["calibration"]["path"] == str(profile)
