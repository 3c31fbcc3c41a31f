"""`pip install .` in a fresh venv without torch: the planner works, the rest names the extra.

Installs from the local wheelhouse `make install` prepares (the planner's dependencies and the
build backend, as wheels) with ``--no-index``, so it needs no network.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import REPO

import ehrplan
from ehrplan.cli.extras import TRAIN_MODULES

WHEELHOUSE = REPO / ".wheelhouse"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def planner_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding `pip install .` and nothing else."""
    if not (WHEELHOUSE / ".done").exists():
        pytest.skip("no .wheelhouse/ (`make install` downloads the planner's wheels into it)")
    env_dir = tmp_path_factory.mktemp("planner") / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-index", "--find-links", str(WHEELHOUSE), str(REPO)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return env_dir


def _run(env_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(env_dir / "bin" / "ehrplan"), *args],
        capture_output=True,
        text=True,
        cwd=env_dir,  # not the repository: only what was installed can be imported
        timeout=120,
    )


def test_the_venv_has_the_planner_and_no_train_extra(planner_venv: Path) -> None:
    probe = (
        "import importlib.util as u, json, ehrplan;"
        f"print(json.dumps([ehrplan.__file__, [m for m in {TRAIN_MODULES!r} if u.find_spec(m)]]))"
    )
    out = subprocess.run(
        [str(planner_venv / "bin" / "python"), "-c", probe],
        capture_output=True, text=True, check=True, cwd=planner_venv,
    )  # fmt: skip
    where, found = json.loads(out.stdout)
    assert Path(where).is_relative_to(planner_venv), where
    assert found == [], f"the base install pulled in {found}"


def test_estimate_recommend_and_validate_run_without_torch(planner_venv: Path) -> None:
    est = _run(planner_venv, "estimate", "--preset", "tiny", "--json")
    assert est.returncode == 0, est.stderr
    assert json.loads(est.stdout)["command"] == "estimate"

    rec = _run(planner_venv, "recommend", "--memory", "16GiB", "--json")
    assert rec.returncode == 0, rec.stderr
    assert json.loads(rec.stdout)["command"] == "recommend"

    fits = _run(
        planner_venv, "validate", str(REPO / "presets/small-lstm.toml"), "--budget", "16GiB"
    )
    assert fits.returncode == 0, fits.stderr

    big = str(REPO / "presets/large-lstm.toml")
    too_big = _run(planner_venv, "validate", big, "--budget", "16GiB")
    assert too_big.returncode == 1, too_big.stderr
    assert too_big.stderr.strip().startswith(f"error: {big} does not fit"), too_big.stderr


@pytest.mark.parametrize("args", [["train"], ["train", "--preset", "tiny"], ["data", "stats", "x"]])
def test_a_training_command_names_the_extra(planner_venv: Path, args: list[str]) -> None:
    out = _run(planner_venv, *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "'train' extra" in lines[0] and "pip install 'ehrplan[train]'" in lines[0]
    assert "Traceback" not in out.stderr


def test_version_and_short_help(planner_venv: Path) -> None:
    assert _run(planner_venv, "--version").stdout.strip() == f"ehrplan {ehrplan.__version__}"
    assert _run(planner_venv, "train", "-h").returncode == 0  # a command's help needs no extra
