"""Faults around a run folder: stale temp files, a run stopped before its first checkpoint, two
writers, another data set on resume, Ctrl-C at any moment, file modes under the umask, and a
two-process run interrupted with Ctrl-C then resumed."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

from ehrplan.cli.app import run

STEPS = 3


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ehrplan.data.synth_write import write_cohort

    root = tmp_path_factory.mktemp("faults") / "ckd"
    write_cohort(root, 60, seed=0)
    return root


def _main(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr, dict(os.environ)
    sys.stdout, sys.stderr = out, err
    os.environ.update(env or {})
    try:
        code = run(list(argv))
    finally:
        sys.stdout, sys.stderr = old[0], old[1]
        os.environ.clear()
        os.environ.update(old[2])
    return code, out.getvalue(), err.getvalue()


def _train(cohort: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return _main(
        "train", "--preset", "tiny", "--data", str(cohort), "--threads", "1", "--max-steps",
        str(STEPS), "--seed", "5", "--out", str(out), "--json", *extra,
    )  # fmt: skip


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "step"]


@pytest.fixture(scope="module")
def reference(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    code, _, err = _train(cohort, run_dir)
    assert code == 0, err
    return run_dir


def test_stale_temp_files_are_removed_on_start_and_on_resume(
    cohort: Path, reference: Path, tmp_path: Path
) -> None:
    fresh = tmp_path / "fresh"  # killed while writing its first file
    fresh.mkdir()
    (fresh / ".config.json.999.deadbeef.tmp").write_text("{")
    code, _, err = _train(cohort, fresh, "--max-steps", "1")
    assert code == 0, err
    assert not list(fresh.rglob("*.tmp"))

    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    stale = [
        resumed / "checkpoints" / ".last.pt.123.abcd1234.tmp",
        resumed / ".memory.json.1.x.tmp",
    ]
    for f in stale:
        f.write_bytes(b"half a checkpoint")
    code, _, err = _main("train", "--resume", "--out", str(resumed), "--json")
    assert code == 0, err
    assert not list(resumed.rglob("*.tmp")), list(resumed.rglob("*.tmp"))
    assert "removed 2 temporary file(s)" in err


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_step_0_or_starts_over(
    cohort: Path, reference: Path, tmp_path: Path
) -> None:
    stopped = tmp_path / "stopped"
    shutil.copytree(reference, stopped)
    shutil.rmtree(stopped / "checkpoints")  # what a run stopped before step 1 leaves
    (stopped / "metrics.jsonl").write_text("")
    code, _, err = _train(cohort, stopped)  # a new run into it: refused, naming the way out
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = _main("train", "--resume", "--out", str(stopped), "--json")
    assert code == 0, err
    assert "from step 0" in err
    assert _losses(stopped) == _losses(reference)  # same seed, same steps, same bits

    code, _, err = _train(cohort, stopped, "--overwrite", "--seed", "6")
    assert code == 0, err
    assert len(_losses(stopped)) == STEPS and _losses(stopped) != _losses(reference)
    assert json.loads((stopped / "config.json").read_text())["settings"]["seed"] == 6


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from ehrplan.runtime.training.lock import RunLock
lock = RunLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_one_writer_per_run_folder_and_a_dead_holder_is_taken_over(
    cohort: Path, reference: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "busy"
    shutil.copytree(reference, folder)
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(folder)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        code, _, err = _main("train", "--resume", "--out", str(folder))
        assert code == 2 and f"process {holder.pid}" in err, err
        assert len(err.strip().splitlines()) == 1
        code, _, err = _train(cohort, folder, "--overwrite")  # a new run is refused as well
        assert code == 2 and f"process {holder.pid}" in err, err
    finally:
        holder.kill()
        holder.wait()
    # the holder died (SIGKILL): its lock is stale, the next writer takes it over
    code, _, err = _main("train", "--resume", "--out", str(folder), "--json")
    assert code == 0, err
    assert f"took over the lock of process {holder.pid}" in err
    assert (folder / ".lock").read_text() == ""  # released at the end


def test_resume_refuses_another_data_set_but_takes_the_same_one_moved(
    cohort: Path, reference: Path, tmp_path: Path
) -> None:
    from ehrplan.data.synth_write import write_cohort

    other = tmp_path / "other"
    write_cohort(other, 60, seed=1)
    folder = tmp_path / "run"
    shutil.copytree(reference, folder)
    code, _, err = _main("train", "--resume", "--out", str(folder), "--data", str(other))
    assert code == 2 and "another data set" in err and "fingerprint" in err, err
    moved = tmp_path / "moved"
    shutil.copytree(cohort, moved)
    code, _, err = _main("train", "--resume", "--out", str(folder), "--data", str(moved))
    assert code == 0, err


def _interrupt_in(monkeypatch: pytest.MonkeyPatch, target: str, after: bool = False) -> None:
    """Ctrl-C while ``module:function`` runs (a real SIGINT when ``after``: the function runs,
    then the process signals itself, as a terminal would)."""
    import importlib

    mod_name, _, attr = target.partition(":")
    owner_name, _, method = attr.partition(".")
    mod = importlib.import_module(mod_name)
    owner = getattr(mod, owner_name) if method else mod
    name = method or attr
    real = getattr(owner, name)

    def hooked(*a: Any, **k: Any) -> Any:
        if not after:
            raise KeyboardInterrupt
        result = real(*a, **k)
        os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(owner, name, hooked)


@pytest.mark.parametrize(
    "target, after, says",
    [
        ("ehrplan.runtime.training.data:load_training_data", False, "before the run folder"),
        ("ehrplan.runtime.training.loop:Trainer._build", False, "before the first checkpoint"),
        ("ehrplan.runtime.training.loop:Trainer._record", True, "last checkpoint: step 1"),
    ],
)
def test_ctrl_c_says_where_the_run_stands(
    cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, after: bool,
    says: str,
) -> None:  # fmt: skip
    _interrupt_in(monkeypatch, target, after)
    code, _, err = _train(cohort, tmp_path / "run")
    assert code == 130, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted") and says in line, err
    assert "Traceback" not in err
    if after:  # the SIGINT saved the step it stopped at: continue from there
        assert f"--resume --out {tmp_path / 'run'}" in line


def _in_group(pgid: int) -> list[int]:
    """The processes still in process group ``pgid``."""
    import psutil

    left = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                left.append(p.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return left


@pytest.mark.slow
def test_ctrl_c_with_collate_workers_stops_cleanly_and_resumes(
    cohort: Path, reference: Path, tmp_path: Path
) -> None:
    from ehrplan.runtime.training.loop import STEP_DELAY_ENV

    out = tmp_path / "run"
    args = ["--preset", "tiny", "--data", str(cohort), "--threads", "1", "--seed", "5"]
    victim = subprocess.Popen(
        [sys.executable, "-m", "ehrplan", "train", *args, "--max-steps", str(STEPS),
         "--out", str(out), "--json", "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), STEP_DELAY_ENV: "2"},
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and victim.poll() is None:
        if metrics.exists() and metrics.read_text().count('"kind": "step"') >= 1:
            break
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the workers too
    _, err = victim.communicate(timeout=300)
    assert victim.returncode == 130, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(said) == 1 and said[0] == err.strip().splitlines()[-1], err[-3000:]
    assert "last checkpoint: step 2" in said[0], said
    assert "Traceback" not in err and "DataLoader" not in err, err[-3000:]
    deadline = time.monotonic() + 1  # the workers were joined before the process exited
    while _in_group(victim.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _in_group(victim.pid)
    code, _, err = _main("train", "--resume", "--out", str(out), "--workers", "0", "--json")
    assert code == 0, err
    assert _losses(out) == _losses(reference)


@pytest.mark.parametrize(
    "umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)]
)
def test_files_and_folders_follow_the_umask(
    tmp_path: Path, umask: int, file_mode: int, dir_mode: int
) -> None:
    from ehrplan.atomic import write_json
    from ehrplan.data.synth_write import write_cohort

    old = os.umask(umask)
    try:
        write_json(tmp_path / "a" / "x.json", {"a": 1})
        write_cohort(tmp_path / "cohort", 60, seed=0)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "x.json").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == dir_mode
    root = tmp_path / "cohort"
    assert stat.S_IMODE(root.stat().st_mode) == dir_mode
    for p in root.rglob("*"):
        want = dir_mode if p.is_dir() else file_mode
        assert stat.S_IMODE(p.stat().st_mode) == want, p


def test_a_run_folder_follows_the_umask(cohort: Path, reference: Path) -> None:
    # the reference run was written under the test process's umask
    umask = os.umask(0)
    os.umask(umask)
    for p in [reference / "config.json", reference / "checkpoints" / "last.pt"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p
    assert stat.S_IMODE((reference / "checkpoints").stat().st_mode) == 0o777 & ~umask


# ------------------------------------------------------------------- two processes, Ctrl-C


NPROC_STEPS = 6
NPROC = (
    "train", "--preset", "tiny", "--max-steps", str(NPROC_STEPS), "--save-every", "100",
    "--eval-every", "100", "--threads", "1", "--device", "cpu", "--json", "--nproc", "2",
)  # fmt: skip


def _nproc(data: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.Popen(
        [sys.executable, "-m", "ehrplan", *NPROC, "--data", str(data), "--out", str(out), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out.parent,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})},
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two processes need two cores")
def test_nproc_2_resume_after_ctrl_c_equals_the_uninterrupted_run(
    cohort: Path, tmp_path: Path
) -> None:
    # dropout 0.1 (the tiny preset's): each rank draws its own dropout masks, so a resume that
    # restored one rank's random streams on both would part from the uninterrupted run
    ref = _nproc(cohort, tmp_path / "ref")
    out, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-3000:]
    reference = json.loads(out)

    from ehrplan.runtime.training.loop import STEP_DELAY_ENV

    # 2 s after each step leaves the Ctrl-C a window of several steps even on a loaded machine
    # (at 0.5 s the run could finish before the signal arrived)
    victim = _nproc(cohort, tmp_path / "victim", env={STEP_DELAY_ENV: "2"})
    metrics = tmp_path / "victim" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and victim.poll() is None:
        if metrics.exists() and metrics.read_text().count('"kind": "step"') >= 2:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGINT)  # a terminal's Ctrl-C reaches the launcher
    _, err = victim.communicate(timeout=300)
    assert victim.returncode == 130, err[-3000:]
    assert "interrupted at step" in err and "last checkpoint: step" in err, err[-3000:]
    import torch

    stopped = torch.load(tmp_path / "victim" / "checkpoints" / "last.pt", weights_only=True)
    assert 2 <= stopped["position"]["step"] < NPROC_STEPS  # saved by the Ctrl-C, not at the end
    assert len(stopped["rng_by_rank"]) == 2

    resumed = _nproc(cohort, tmp_path / "victim", "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    summary = json.loads(out)
    assert _losses(tmp_path / "victim") == _losses(tmp_path / "ref")
    assert summary["best"] == reference["best"] and summary["last"] == reference["last"]
