"""`ehrplan train` under torchrun on this CPU (gloo): DDP and FSDP2 against one process.

A single process and a two-process job train the tiny preset (dropout 0, so no random stream
differs between them) for the same steps with the same seed and effective batch; the loss of every
step must agree. An audit hook (a ``sitecustomize`` on ``PYTHONPATH``) logs which rank opens a
file for writing, creates, renames or removes anything in the run folder: only rank 0 may.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

STEPS = 4
COMMON = (
    "train", "--preset", "tiny", "--set", "dropout=0", "--max-steps", str(STEPS),
    "--threads", "1", "--patients", "200", "--device", "cpu", "--json",
)  # fmt: skip

AUDIT = """
import os, sys
_log = os.environ.get("EHRPLAN_TEST_WRITE_LOG")
_run = os.environ.get("EHRPLAN_TEST_RUN_DIR")
if _log and _run:
    _f = open(_log, "a", buffering=1)
    _rank = os.environ.get("RANK", "-")
    _run = os.path.abspath(_run)
    def _hook(event, args):
        if event == "open":
            path, mode = args[0], args[1] or "r"
            if not any(c in str(mode) for c in "wax+"):
                return
        elif event in ("os.rename", "os.remove", "os.mkdir", "shutil.rmtree"):
            path = args[0]
        else:
            return
        if isinstance(path, (str, bytes, os.PathLike)):
            p = os.path.abspath(os.fsdecode(path))
            if p.startswith(_run):
                _f.write(f"{_rank} {event} {p}\\n")
    sys.addaudithook(_hook)
"""


def _env(tmp: Path, run_dir: Path) -> dict[str, str]:
    hook = tmp / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(AUDIT)
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "EHRPLAN_CACHE": str(tmp / "cache"),
        "EHRPLAN_TEST_WRITE_LOG": str(tmp / f"writes-{run_dir.name}.log"),
        "EHRPLAN_TEST_RUN_DIR": str(run_dir),
        "OMP_NUM_THREADS": "1",
    }


def _train(tmp: Path, name: str, *extra: str, torchrun: int = 0) -> tuple[dict, Path, list[str]]:
    run_dir = tmp / name
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"]
    cmd = [*launcher, "-m", "ehrplan", *COMMON, "--out", str(run_dir), *extra]
    log = tmp / f"writes-{run_dir.name}.log"
    log.unlink(missing_ok=True)  # this command's writes only
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=tmp, env=_env(tmp, run_dir), timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    writes = log.read_text().splitlines() if log.exists() else []
    return json.loads(proc.stdout), run_dir, writes


def _step_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "step"]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("torchrun")


@pytest.fixture(scope="module")
def single(tmp: Path) -> tuple[dict, Path, list[str]]:
    return _train(tmp, "single")


@pytest.mark.slow
def test_ddp_on_two_processes_trains_as_one(tmp, single):
    # each rank collates its own share in two worker processes (the single run: in-process)
    summary, run_dir, writes = _train(tmp, "ddp", "--workers", "2", torchrun=2)
    reference = _step_losses(single[1])
    losses = _step_losses(run_dir)
    assert len(losses) == len(reference) == STEPS  # one line per step: one writer
    assert losses == pytest.approx(reference, rel=1e-5, abs=1e-6)
    assert summary["distributed"] == {
        "strategy": "ddp", "world_size": 2, "micro_batch_per_rank": 8, "accumulation_per_rank": 1
    }  # fmt: skip
    assert summary["patients_trained"] == single[0]["patients_trained"]  # both ranks counted
    ranks = {w.split()[0] for w in writes}
    assert ranks == {"0"}, writes[:5]
    assert {p.name for p in run_dir.iterdir()} == {p.name for p in single[1].iterdir()}


@pytest.mark.slow
def test_fsdp_with_visits_of_many_lengths_keeps_the_ranks_collectives_in_step(tmp):
    """Visits of up to 50 codes make the CPU's within-visit LSTM run several length groups, a
    number that differs from rank to rank; under FSDP each call of the sharded LSTM was an
    all-gather, so the ranks' collectives stopped matching (gloo: "Received data size doesn't
    match expected size"). FSDP runs that LSTM once per micro-batch."""
    wide = ("--set", "max_codes_per_visit=50", "--set", "max_visits=50")
    summary, run_dir, _ = _train(tmp, "fsdp-wide", "--nproc", "2", "--shard", *wide)
    assert summary["distributed"]["strategy"] == "fsdp"
    assert len(_step_losses(run_dir)) == STEPS


@pytest.mark.slow
def test_fsdp_via_nproc_trains_as_one_and_resumes_only_on_its_world_size(tmp, single):
    # --nproc 2 execs torchrun; --shard is FSDP2 (fully_shard per embedding table / LSTM)
    summary, run_dir, writes = _train(tmp, "fsdp", "--nproc", "2", "--shard")
    assert summary["distributed"]["strategy"] == "fsdp"
    assert _step_losses(run_dir) == pytest.approx(_step_losses(single[1]), rel=1e-5, abs=1e-6)
    for split in ("tuning", "held_out"):  # each rank predicted its share, the model gathered
        for which in ("best", "last"):
            assert summary[which][split]["examples"] == single[0][which][split]["examples"]
            loss = single[0][which][split]["loss"]
            assert summary[which][split]["loss"] == pytest.approx(loss, rel=1e-4)
    assert {w.split()[0] for w in writes} == {"0"}, writes[:5]
    # the checkpoint's model is unsharded: a single process can read it as is
    import torch

    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["distributed"] == {"strategy": "fsdp", "world_size": 2}
    assert state["model"]["encoder.code_embeddings.weight"].shape[1] == 16
    # resuming on one process (or without --shard) is refused in one line
    proc = subprocess.run(
        [sys.executable, "-m", "ehrplan", *COMMON, "--out", str(run_dir), "--resume"],
        capture_output=True, text=True, cwd=tmp, env=_env(tmp, tmp / "none"), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and "on 2 processes" in proc.stderr


@pytest.mark.slow
def test_ddp_run_resumes_on_another_world_size(tmp, single):
    # the single-process run's checkpoint loads on two processes (allowed, with a warning)
    summary, _, writes = _train(tmp, "single", "--resume", torchrun=2)
    assert summary["steps"] == STEPS and summary["distributed"]["world_size"] == 2
    assert {w.split()[0] for w in writes} == {"0"}, writes[:5]
    # the same weights, each rank predicting its share of the splits: one process's metrics
    assert summary["best"] == single[0]["best"] and summary["last"] == single[0]["last"]


@pytest.mark.parametrize(
    "args, message",
    [
        (("--shard",), "at least 2"),  # FSDP on one process
        (("--nproc", str((os.cpu_count() or 1) + 1)), "CPU cores"),  # more than the cores
    ],
)
def test_unsupported_combinations_exit_2(tmp, args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "ehrplan", *COMMON, "--out", str(tmp / "refused"), *args],
        capture_output=True, text=True, cwd=tmp, env=_env(tmp, tmp / "refused"), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr
    assert not (tmp / "refused").exists()
