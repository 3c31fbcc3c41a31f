"""Shared test helpers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m ehrplan ARGS` in a fresh interpreter, capturing output."""
    return subprocess.run(
        [sys.executable, "-m", "ehrplan", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )


NO_TORCH = """
import sys
from ehrplan.cli.app import main
sys.argv = ["ehrplan", *{args!r}]
code = 0
try:
    main()
except SystemExit as e:
    code = e.code or 0
assert "torch" not in sys.modules, "torch was imported"
print("NO_TORCH_OK", code)
"""


def run_without_torch(args: list[str]) -> tuple[int, str, str]:
    """Run `ehrplan ARGS` in a fresh interpreter and assert it never imported torch.
    Returns the exit code, stdout (without the marker line) and stderr."""
    out = subprocess.run(
        [sys.executable, "-c", NO_TORCH.format(args=args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert "NO_TORCH_OK" in out.stdout, out.stderr
    body, _, tail = out.stdout.rpartition("NO_TORCH_OK")
    return int(tail.split()[0]), body, out.stderr


@pytest.fixture(scope="session", autouse=True)
def _cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Generated cohorts and example caches go to a temporary folder, not the user's cache
    (subprocesses inherit it); a caller's own EHRPLAN_CACHE is kept."""
    import os

    os.environ.setdefault("EHRPLAN_CACHE", str(tmp_path_factory.mktemp("ehrplan-cache")))


@pytest.fixture
def cli():
    return run_cli
