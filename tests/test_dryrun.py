"""`ehrplan dry-run`: JSON, the 10% bound on tiny, "does not fit" and device errors."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli, run_without_torch


def _in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process (torch is already imported here: no start-up cost)."""
    from ehrplan.cli.app import main

    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_tiny_json_reports_measured_and_estimated_peaks(capsys):
    code, out, err = _in_process(capsys, "dry-run", "--preset", "tiny", "--device", "cpu", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["command"] == "dry-run" and doc["device"] == "cpu"
    for key in ("measured_peak_bytes", "estimated_peak_bytes", "process_peak_rss_bytes"):
        assert isinstance(doc[key], int) and doc[key] > 0, key
    assert doc["error"] == pytest.approx(
        (doc["estimated_peak_bytes"] - doc["measured_peak_bytes"]) / doc["measured_peak_bytes"]
    )
    assert abs(doc["error"]) <= 0.10
    assert "peak_reserved_bytes" in doc  # None on the CPU, which has no reserve
    assert sum(doc["estimate_breakdown"].values()) == doc["estimated_peak_bytes"]


def test_checkpointing_flag_reaches_the_step(capsys):
    args = ["dry-run", "--preset", "tiny-transformer", "--checkpointing", "-b", "4", "--json"]
    code, out, err = _in_process(capsys, *args)
    assert code == 0, err
    assert json.loads(out)["checkpointing"] is True


def test_a_batch_that_cannot_fit_is_refused_before_torch_is_imported():
    args = ["dry-run", "--preset", "tiny", "--batch-size", "100000", "--device", "cpu"]
    code, _, err = run_without_torch(args)
    assert code == 1, err
    assert "does not fit" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_does_not_fit_exit_code_from_the_cli():
    r = run_cli("dry-run", "--preset", "tiny", "--batch-size", "100000")
    assert r.returncode == 1
    assert r.stderr.startswith("error: does not fit")


@pytest.mark.parametrize(
    ("device", "fragment"),
    [("tpu", "unknown device"), ("cuda", "not present"), ("mps", "not present")],
)
def test_unknown_or_absent_device_exits_2(device, fragment):
    import torch

    present = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if present.get(device):
        pytest.skip(f"{device} is present here")
    r = run_cli("dry-run", "--preset", "tiny", "--device", device)
    assert r.returncode == 2
    assert fragment in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("preset", ["tiny-lstm", "tiny-transformer"])
def test_simulate_is_refused_with_a_reason(preset):
    r = run_cli("dry-run", "--preset", preset, "--simulate")
    assert r.returncode == 2
    assert "fake tensors" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert ("nn.LSTM" in r.stderr) == (preset == "tiny-lstm")


def test_data_measures_the_largest_real_batch(capsys, tmp_path):
    """--data: the largest length-bucketed batch of the data's train split, with its within-visit
    length groups, measured beside the estimate for exactly that batch."""
    from ehrplan.data.synth_write import write_cohort

    write_cohort(tmp_path / "ckd", 80, seed=1)
    args = ["dry-run", "--preset", "tiny", "--device", "cpu", "--json"]
    code, out, err = _in_process(capsys, *args, "--data", str(tmp_path / "ckd"))
    assert code == 0, err
    doc = json.loads(out)
    b, v, c = doc["batch_shape"]
    assert b == doc["batch_size"] and 1 <= v <= 16 and 1 <= c <= 12  # within tiny's maxima
    assert doc["visit_groups"] and sum(n for n, _ in doc["visit_groups"]) <= b * v
    assert abs(doc["error"]) <= 0.10
    code, _, err = _in_process(capsys, *args, "--data", str(tmp_path / "nope"))
    assert code == 2 and "no such directory" in err and len(err.strip().splitlines()) == 1
