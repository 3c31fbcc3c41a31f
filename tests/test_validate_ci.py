"""CI gating as a drop-in: `validate --format github|junit`, JSON configs and run folders, the
composite action (action.yml: its steps' commands run in a shell, with its inputs substituted,
against this environment) and the pre-commit hook's definition."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, run_cli, run_without_torch

from ehrplan.plan.config import get_preset, load_config_file

BUDGET = "16GiB"  # small-lstm fits it, large-lstm (26.41 GiB in bf16) does not


def _annotations(stdout: str) -> list[tuple[str, dict[str, str], str]]:
    """(level, properties, message) of each workflow-command line."""
    out = []
    for line in stdout.splitlines():
        m = re.fullmatch(r"::(\w+) ?([^:]*)::(.*)", line)
        assert m, line
        props = dict(p.split("=", 1) for p in m.group(2).split(",") if p)
        out.append((m.group(1), props, m.group(3)))
    return out


def test_github_format_annotates_each_config_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("hidden_dim = 64\nbatch_size = 4\nno_such_field = 1\n")
    ok = run_cli("validate", "presets/small-lstm.toml", "tiny", "--budget", BUDGET, "-f", "github")
    assert ok.returncode == 0, ok.stderr
    (l1, p1, m1), (l2, p2, _) = _annotations(ok.stdout)
    assert (l1, p1["file"], p1["line"]) == ("notice", "presets/small-lstm.toml", "1")
    assert "fits" in m1 and "file" not in p2  # a preset name has no file to annotate
    short = run_cli("validate", "presets/large-lstm.toml", "--budget", BUDGET, "--format", "github")
    assert short.returncode == 1
    [(level, props, msg)] = _annotations(short.stdout)
    assert level == "error" and props["file"] == "presets/large-lstm.toml"
    assert "does not fit" in msg and "short by" in msg
    invalid = run_cli(
        "validate", "presets/small-lstm.toml", str(bad), "--budget", BUDGET, "-f", "github"
    )
    assert invalid.returncode == 2  # every config reported, then the worst exit code
    (l1, _, _), (l2, p2, m2) = _annotations(invalid.stdout)
    assert (l1, l2, p2["file"], p2["line"]) == ("notice", "error", str(bad), "3")
    assert "no_such_field" in m2
    assert len(invalid.stderr.strip().splitlines()) == 1


def test_junit_format_has_one_case_per_config_and_a_failure_for_each_bad_one(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("hidden_dim = \n")
    items = ["presets/small-lstm.toml", "presets/large-lstm.toml", str(broken)]
    out = run_cli("validate", *items, "--budget", BUDGET, "--format", "junit")
    assert out.returncode == 2, out.stderr
    suite = ET.fromstring(out.stdout).find("testsuite")
    assert suite is not None
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == items
    assert (suite.get("tests"), suite.get("failures")) == ("3", "2")
    kinds = [(f.get("type") if (f := c.find("failure")) is not None else None) for c in cases]
    assert kinds == [None, "DoesNotFit", "InvalidConfig"]
    out = run_cli("validate", "presets/large-lstm.toml", "--budget", BUDGET, "-f", "junit")
    assert out.returncode == 1 and ET.fromstring(out.stdout).get("failures") == "1"


def test_format_json_is_json_and_contradictions_are_refused() -> None:
    a = run_cli("validate", "tiny", "--budget", BUDGET, "--format", "json")
    b = run_cli("validate", "tiny", "--budget", BUDGET, "--json")
    assert a.returncode == b.returncode == 0
    assert json.loads(a.stdout)["results"] == json.loads(b.stdout)["results"]
    both = run_cli("validate", "tiny", "--budget", BUDGET, "--json", "--format", "junit")
    assert both.returncode == 2 and "--format" in both.stderr


def _run_folder_config(tmp_path: Path) -> Path:
    """A run folder's config.json in the shape `ehrplan train` writes (the resolved config
    under "config", beside how the run was made)."""
    run = tmp_path / "run"
    run.mkdir()
    config = get_preset("small-lstm").config.model_dump() | {"vocab_size": 188}
    doc = {
        "config": config,
        "config_requested": get_preset("small-lstm").config.model_dump(),
        "source": "preset small-lstm",
        "preset": "small-lstm",
        "reasons": [],
        "settings": {"epochs": 10, "lr": 0.001},
        "device": "cpu",
        "precision": "fp32",
        "data": {"root": "data/ckd"},
        "command": ["ehrplan", "train"],
    }
    (run / "config.json").write_text(json.dumps(doc, indent=2))
    return run


def test_json_configs_and_run_folders_are_read(tmp_path: Path) -> None:
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"hidden_dim": 64, "batch_size": 2}))
    assert load_config_file(flat) == {"hidden_dim": 64, "batch_size": 2}
    run = _run_folder_config(tmp_path)
    assert load_config_file(run / "config.json")["vocab_size"] == 188
    assert load_config_file(run) == load_config_file(run / "config.json")
    est = run_cli("estimate", "--config", str(run / "config.json"), "--json")
    assert est.returncode == 0, est.stderr
    assert json.loads(est.stdout)["config"]["vocab_size"] == 188
    out = run_cli("validate", str(flat), str(run), "--budget", BUDGET, "--json")
    assert out.returncode == 0, out.stderr
    assert [r["name"] for r in json.loads(out.stdout)["results"]] == [str(flat), str(run)]
    gh = run_cli("validate", str(run), "--budget", BUDGET, "-f", "github")
    assert _annotations(gh.stdout)[0][1]["file"] == str(run / "config.json")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"hidden_dim": NaN}', "NaN"),
        ("[1, 2]", "object of fields"),
        ('{"hidden_dim": 64', "malformed JSON"),
        ('{"no_such_field": 1}', "unknown field 'no_such_field'"),
        ('{"config": {"dropout": 2}}', "dropout"),
    ],
)
def test_bad_json_configs_are_one_line_exit_2(tmp_path: Path, text: str, fragment: str) -> None:
    f = tmp_path / "c.json"
    f.write_text(text)
    out = run_cli("validate", str(f), "--budget", BUDGET)
    assert out.returncode == 2
    assert fragment in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr


# ---------------------------------------------------------------------------- action.yml


def _action() -> dict[str, Any]:
    return yaml.safe_load((REPO / "action.yml").read_text())


def _substitute(text: str, inputs: dict[str, str]) -> str:
    """GitHub's ``${{ inputs.NAME }}`` expressions, the only ones the action's steps use."""

    def value(m: re.Match[str]) -> str:
        expr = m.group(1).strip()
        assert expr.startswith("inputs."), f"unexpected expression {expr}"
        return inputs[expr.removeprefix("inputs.")]

    return re.sub(r"\$\{\{(.*?)\}\}", value, text)


def _run_step(step: dict[str, Any], inputs: dict[str, str], cwd: Path, **env: str):
    """One `run:` step as the runner runs a bash step: its env with the inputs substituted,
    `bash --noprofile --norc -eo pipefail`, this environment's python and ehrplan on PATH."""
    assert step["shell"] == "bash"
    environ = dict(os.environ)
    environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environ['PATH']}"
    environ["GITHUB_ACTION_PATH"] = str(REPO)
    environ.update({k: _substitute(str(v), inputs) for k, v in step.get("env", {}).items()})
    environ.update(env)
    script = _substitute(step["run"], inputs)
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environ,
        timeout=300,
    )


def _inputs(**given: str) -> dict[str, str]:
    spec = _action()["inputs"]
    return {
        name: given.get(name.replace("-", "_"), i.get("default", "")) for name, i in spec.items()
    }


def test_action_declares_its_inputs_and_installs_the_planner_only() -> None:
    action = _action()
    assert action["runs"]["using"] == "composite"
    assert {"configs", "budget", "target", "headroom", "format", "python-version"} <= set(
        action["inputs"]
    )
    install = next(s for s in action["runs"]["steps"] if s.get("id") == "install")
    assert re.search(r"pip install .*\"\$GITHUB_ACTION_PATH\"$", install["run"].strip())
    assert "[" not in install["run"]  # no extras: the planner, not torch


def test_action_install_step_resolves_to_the_planner_without_torch(tmp_path: Path) -> None:
    """The install step as a pip dry run (``--dry-run --report`` added), offline from the
    planner's local wheelhouse: what it would install."""
    wheelhouse = REPO / ".wheelhouse"
    if not (wheelhouse / ".done").exists():
        pytest.skip("no .wheelhouse (`make install` prepares it)")
    install = next(s for s in _action()["runs"]["steps"] if s.get("id") == "install")
    report = tmp_path / "report.json"
    dry = install | {
        "run": install["run"].replace(
            "pip install", f"pip install --dry-run --ignore-installed --report {report}"
        )
    }
    out = _run_step(dry, _inputs(), tmp_path, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheelhouse))
    assert out.returncode == 0, out.stderr
    names = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert "ehrplan" in names and "pydantic" in names
    assert not names & {"torch", "numpy", "pyarrow", "scikit-learn", "matplotlib"}


def _validate_step() -> dict[str, Any]:
    return next(s for s in _action()["runs"]["steps"] if s.get("id") == "validate")


def test_action_passes_for_configs_that_fit() -> None:
    inputs = _inputs(configs="presets/small-*.toml\ntiny", budget=BUDGET)
    out = _run_step(_validate_step(), inputs, REPO)
    assert out.returncode == 0, out.stderr
    files = [p.get("file") for _, p, _ in _annotations(out.stdout)]
    small = sorted(str(p.relative_to(REPO)) for p in (REPO / "presets").glob("small-*.toml"))
    assert len(small) >= 2 and files == [*small, None]  # the glob expanded, then the preset


def test_action_fails_the_job_for_a_config_that_does_not_fit(tmp_path: Path) -> None:
    inputs = _inputs(configs="presets/small-lstm.toml presets/large-lstm.toml", budget=BUDGET)
    out = _run_step(_validate_step(), inputs, REPO)
    assert out.returncode == 1
    levels = [(level, p["file"]) for level, p, _ in _annotations(out.stdout)]
    assert levels == [("notice", "presets/small-lstm.toml"), ("error", "presets/large-lstm.toml")]
    report = tmp_path / "report.xml"
    inputs = _inputs(
        configs="presets/large-lstm.toml", target="a10", headroom="0.2", format="junit",
        report=str(report),
    )  # fmt: skip
    out = _run_step(_validate_step(), inputs, REPO)
    assert out.returncode == 1  # through the tee: pipefail keeps ehrplan's code
    root = ET.fromstring(report.read_text())
    props = {p.get("name"): p.get("value") for p in root.iter("property")}
    assert props["headroom"] == "0.2" and "a10" in props["budget"]
    assert root.get("failures") == "1"


# ---------------------------------------------------------------------------- pre-commit


def test_pre_commit_hook_runs_validate_on_config_files() -> None:
    [hook] = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    assert hook["id"] == "ehrplan-validate" and hook["language"] == "python"
    files, exclude = re.compile(hook["files"]), re.compile(hook["exclude"])

    def selected(path: str) -> bool:
        return bool(files.search(path)) and not exclude.search(path)

    assert selected("presets/small-lstm.toml") and selected("configs/a/b.json")
    assert not selected("presets/hardware.toml") and not selected("pyproject.toml")
    entry = hook["entry"].split()
    assert entry[:2] == ["ehrplan", "validate"]
    argv = [*entry[1:], *hook["args"]]
    assert run_cli(*argv, "presets/small-lstm.toml").returncode == 0
    assert run_cli(*argv, "presets/large-lstm.toml").returncode == 1


@pytest.mark.parametrize("fmt", ["github", "junit"])
def test_ci_formats_never_import_torch(fmt: str) -> None:
    args = ["validate", "presets/small-lstm.toml", "--budget", BUDGET, "--format", fmt]
    code, out, err = run_without_torch(args)
    assert code == 0, err
    assert "small-lstm.toml" in out
