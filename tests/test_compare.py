"""`ehrplan compare` on the tiny presets and a tiny cohort: both runs share data, steps, seed and
threads; every number in the table is the runs' own; the three files are written; bad input is a
one-line error with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ehrplan.cli.app import main
from ehrplan.runtime.compare import FILES, ROWS, markdown

STEPS = 6


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ehrplan.data.synth_write import write_cohort

    root = tmp_path_factory.mktemp("cohort") / "ckd"
    write_cohort(root, 120, seed=1)
    return root


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err.strip()


@pytest.fixture(scope="module")
def compared(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("cmp") / "tiny"
    args = ["compare", "--size", "tiny", "--data", str(cohort), "--max-steps", str(STEPS)]
    args += ["--eval-every", "3", "--threads", "1", "--seed", "5", "--out", str(out), "--json"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert int(e.value.code or 0) == 0
    return json.loads((out / FILES["json"]).read_text())


@pytest.mark.slow
def test_both_runs_are_trained_alike(compared: dict[str, Any], cohort: Path) -> None:
    configs = {
        t: json.loads((Path(s["run_dir"]) / "config.json").read_text())
        for t, s in compared["models"].items()
    }
    lstm, tr = configs["lstm"], configs["transformer"]
    assert lstm["config"]["model_type"] == "lstm" and tr["config"]["model_type"] == "transformer"
    assert lstm["data"]["root"] == tr["data"]["root"] == str(cohort)
    assert lstm["data"]["patients"] == tr["data"]["patients"]  # the same split
    assert lstm["config"]["vocab_size"] == tr["config"]["vocab_size"]
    for key in ("seed", "threads", "max_steps", "eval_every"):
        assert lstm["settings"][key] == tr["settings"][key], key
    assert lstm["settings"]["seed"] == 5 and lstm["settings"]["threads"] == 1
    steps = {}
    for t, s in compared["models"].items():
        assert s["steps"] == STEPS
        records = [json.loads(x) for x in (Path(s["run_dir"]) / "metrics.jsonl").open()]
        steps[t] = [r for r in records if r["kind"] == "step"]
        assert [r["step"] for r in steps[t]] == list(range(1, STEPS + 1))
    # tiny-lstm and tiny-transformer share the micro-batch size: same seed, same batches
    for a, b in zip(steps["lstm"], steps["transformer"], strict=True):
        assert (a["max_batch_shape"], a["patients"]) == (b["max_batch_shape"], b["patients"])


@pytest.mark.slow
def test_every_number_is_the_runs_own(compared: dict[str, Any]) -> None:
    for s in compared["models"].values():
        run = Path(s["run_dir"])
        summary = json.loads((run / "summary.json").read_text())
        memory = json.loads((run / "memory.json").read_text())
        weights = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
        assert s["parameters"] == sum(v.numel() for v in weights.values())
        assert s["measured_peak_bytes"] == max(m["measured_peak_bytes"] for m in memory) > 0
        largest = max(memory, key=lambda m: m["measured_peak_bytes"])
        assert s["estimate_for_measured_batch_bytes"] == largest["estimated_peak_bytes"]
        assert s["estimated_peak_bytes"] == summary["estimate_bytes"] > 0
        assert s["patients_per_s"] == summary["patients_per_s"] > 0
        assert s["wall_seconds"] >= summary["train_seconds"] > 0
        for k, v in s["held_out"].items():
            assert v == summary["best"]["held_out"][k], k


@pytest.mark.slow
def test_the_three_files(compared: dict[str, Any]) -> None:
    files = {k: Path(v) for k, v in compared["files"].items()}
    assert files["markdown"].read_text() == markdown(compared)
    md = files["markdown"].read_text()
    for label, _, _ in ROWS:
        assert label.strip() in md
    for s in compared["models"].values():
        assert f" {s['parameters']:,} |" in md
    png = files["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(files["png"]).shape[:2] == (450, 1200)
    assert not list(files["png"].parent.rglob("*.tmp"))


def test_bad_input_is_one_line_and_exit_2(
    cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _main(capsys, "compare", "--size", "huge", "--data", str(cohort))
    assert code == 2 and "unknown size 'huge'" in err and len(err.splitlines()) == 1, err
    (tmp_path / FILES["json"]).write_text("{}")
    code, _, err = _main(
        capsys, "compare", "--data", str(cohort), "--out", str(tmp_path), "--threads", "1"
    )
    assert code == 2 and "already holds a comparison" in err and len(err.splitlines()) == 1, err
