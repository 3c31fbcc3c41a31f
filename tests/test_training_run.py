"""`ehrplan train` end to end on the tiny preset and a tiny synthetic cohort: resume is exact
after an exception, SIGINT and SIGKILL; divergence keeps the last good checkpoint; bad input is a
one-line error with exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ehrplan.cli.app import main
from ehrplan.errors import DivergedError
from ehrplan.plan.config import get_preset
from ehrplan.runtime.training.checkpoint import load_checkpoint
from ehrplan.runtime.training.data import load_training_data
from ehrplan.runtime.training.loop import STEP_DELAY_ENV, Trainer, TrainSettings

REPO = Path(__file__).resolve().parents[1]

STEPS = 12
SETTINGS = dict(max_steps=STEPS, save_every=3, eval_every=4, seed=3, threads=1)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ehrplan.data.synth_write import write_cohort

    root = tmp_path_factory.mktemp("cohort") / "ckd"
    write_cohort(root, 150, seed=0)
    return root


@pytest.fixture(scope="module")
def data(cohort: Path) -> Any:
    return load_training_data(cohort, get_preset("tiny").config)


def _trainer(data: Any, run_dir: Path, **kw: Any) -> Trainer:
    d, config = data
    return Trainer(config, TrainSettings(**SETTINGS), d, run_dir, rich=False, **kw)


@pytest.fixture(scope="module")
def reference(data: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    summary = _trainer(data, run_dir).run()
    summary["weights"] = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    return summary


def _same_result(summary: dict[str, Any], reference: dict[str, Any], run_dir: Path) -> None:
    assert summary["steps"] == reference["steps"] == STEPS
    for which in ("last", "best"):
        assert summary[which] == reference[which]  # every metric, exactly
    weights = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    for k, v in reference["weights"].items():
        assert torch.equal(weights[k], v), k
    steps = [
        r["step"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "step"
    ]
    assert steps == list(range(1, STEPS + 1))  # replayed steps are logged once


def test_the_run_folder_keeps_everything(reference: dict[str, Any]) -> None:
    run = Path(reference["run_dir"])
    for name in ("metrics.jsonl", "memory.json", "summary.json", "curves.png"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "best.pt").is_file()
    assert not list(run.rglob("*.tmp"))
    mem = json.loads((run / "memory.json").read_text())[0]
    assert mem["step"] == 2 and mem["measured_peak_bytes"] > 0 and mem["estimated_peak_bytes"] > 0


def test_resume_after_a_crash_is_exact(
    data: Any, reference: dict[str, Any], tmp_path: Path
) -> None:
    class Crash(Exception):
        pass

    def crash(trainer: Trainer, rec: dict[str, Any]) -> None:
        if rec["step"] == 7:  # last.pt is from step 6: step 7 is replayed
            raise Crash

    with pytest.raises(Crash):
        _trainer(data, tmp_path, on_step=crash).run()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["position"]["step"] == 6
    _same_result(_trainer(data, tmp_path).run(resume=True), reference, tmp_path)


def test_sigint_saves_then_resume_is_exact(
    data: Any, reference: dict[str, Any], tmp_path: Path
) -> None:
    def ctrl_c(trainer: Trainer, rec: dict[str, Any]) -> None:
        if rec["step"] == 5:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        _trainer(data, tmp_path, on_step=ctrl_c).run()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["position"]["step"] == 5
    _same_result(_trainer(data, tmp_path).run(resume=True), reference, tmp_path)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    data: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = _trainer(data, tmp_path)
    real_step = Trainer._train_step_body

    def poisoned(
        self: Trainer, step: Any, stream: Any, tracker: Any, measure: bool
    ) -> dict[str, Any]:
        if self.pos.step == 4:  # the 5th step
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return real_step(self, step, stream, tracker, measure)

    monkeypatch.setattr(Trainer, "_train_step_body", poisoned)
    with pytest.raises(DivergedError, match=r"diverged at step 5.*last good checkpoint kept"):
        trainer.run()
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["position"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


# ------------------------------------------------------------------------------ the command


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ehrplan", "train", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_reaches_the_same_metrics(cohort: Path, tmp_path: Path) -> None:
    args = ["--preset", "tiny", "--data", str(cohort), "--max-steps", str(STEPS)]
    args += ["--save-every", "2", "--eval-every", "4", "--seed", "3", "--threads", "1", "--json"]
    ref = _cli(*args, "--out", "ref", cwd=tmp_path)
    victim = _cli(*args, "--out", "victim", cwd=tmp_path, env={STEP_DELAY_ENV: "0.3"})
    ckpt = tmp_path / "victim" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and victim.poll() is None:
        if ckpt.exists() and load_checkpoint(ckpt)["position"]["step"] >= 4:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    stopped_at = load_checkpoint(ckpt)["position"]["step"]  # a whole, readable checkpoint
    assert 4 <= stopped_at < STEPS
    out, err = ref.communicate(timeout=120)
    assert ref.returncode == 0, err
    resumed = _cli("--resume", "--out", "victim", "--json", cwd=tmp_path)
    out2, err2 = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err2
    a, b = json.loads(out), json.loads(out2)
    assert b["steps"] == a["steps"] == STEPS
    assert a["best"] == b["best"] and a["last"] == b["last"]
    assert not list((tmp_path / "victim").rglob("*.tmp"))


def _exit(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(["train", *args])
    err = capsys.readouterr().err.strip()
    return int(e.value.code), err


def test_bad_input_is_one_line_and_exit_2(
    cohort: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    tiny = ["--preset", "tiny", "--threads", "1", "--max-steps", "2"]
    cases = {
        "no such directory": [*tiny, "--data", str(tmp_path / "nope")],
        "no labels": [*tiny, "--data", str(tmp_path / "unlabelled")],
        "does not fit": ["--preset", "large-lstm", "--batch-size", "100000", "--data", str(cohort)],
        "no run to resume": ["--resume", "--out", str(tmp_path / "empty")],
        "--auto picks the preset": ["--auto", "--preset", "tiny"],
        "--bucket-patients": [*tiny, "--bucket-patients", "-5"],
    }
    shutil.copytree(cohort, tmp_path / "unlabelled", ignore=shutil.ignore_patterns("tasks"))
    for want, args in cases.items():
        code, err = _exit(capsys, *args)
        assert code == 2, (want, err)
        assert want in err and len(err.splitlines()) == 1, err


def test_resume_with_another_config_is_refused(
    cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = str(tmp_path / "run")
    base = ["--data", str(cohort), "--threads", "1", "--max-steps", "2", "--out", run]
    assert _exit(capsys, "--preset", "tiny", *base)[0] == 0
    code, err = _exit(capsys, "--preset", "tiny-transformer", "--resume", *base)
    assert code == 2 and "different config" in err, err
    code, err = _exit(capsys, "--preset", "tiny", *base)  # a fresh run into a used folder
    assert code == 2 and "already holds a run" in err, err
