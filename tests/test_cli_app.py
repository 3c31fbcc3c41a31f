"""The command registry: lazy loading, the help lines it lists, and the `train` extra check."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO

from ehrplan import __version__
from ehrplan.cli import app as app_module
from ehrplan.cli import extras
from ehrplan.cli.app import COMMANDS, load_command, main

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

# pip distribution name -> import name, where they differ
_IMPORT_NAMES = {"scikit-learn": "sklearn"}


def _first_paragraph(text: str) -> str:
    return " ".join(text.strip().split("\n\n")[0].split())


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_listed_help_line_is_the_commands_own(name: str) -> None:
    cmd = load_command(name)
    assert cmd.name == name
    assert COMMANDS[name].help == _first_paragraph(cmd.help or "")


def _helps(cmd: object) -> list[tuple[str, str]]:
    out = [(str(getattr(cmd, "name", "")), str(getattr(cmd, "help", None) or ""))]
    for sub in (getattr(cmd, "commands", None) or {}).values():
        out += _helps(sub)
    return out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_paragraphs_are_one_line_each_so_rich_wraps_them(name: str) -> None:
    """Typer's rich mode keeps a docstring's line breaks: a paragraph must reach it as one line
    (a list, one line per item), or `--help` shows the source's ragged lines at every width."""
    for sub, text in _helps(load_command(name)):
        for para in text.split("\n\n"):
            if para.startswith("\b"):
                continue
            for line in para.splitlines()[1:]:
                assert app_module._LIST_ITEM.match(line), (sub, line)


def test_reflow_joins_prose_and_keeps_list_items() -> None:
    doc = """First line
    goes on.

    - one item
      continued
    - two

    \b
    kept
    as is"""
    assert app_module.reflow(doc) == (
        "First line goes on.\n\n- one item continued\n- two\n\n\b\nkept\nas is"
    )


def test_the_train_modules_are_the_train_extra_of_pyproject() -> None:
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["train"]
    names = {re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0] for req in extra}
    assert {_IMPORT_NAMES.get(n, n.replace("-", "_")) for n in names} == set(extras.TRAIN_MODULES)


def test_planner_commands_are_the_torch_free_ones() -> None:
    planner = {n for n, c in COMMANDS.items() if c.planner}
    assert planner == {"presets", "estimate", "hardware", "recommend", "validate", "schema"}


@pytest.mark.parametrize("argv", [["train"], ["synth", "--out", "x"], ["data", "stats", "d"]])
def test_a_command_of_the_extra_stops_with_one_line_when_it_is_missing(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = extras.find_spec
    monkeypatch.setattr(
        extras, "find_spec", lambda name: None if name in ("torch", "pyarrow") else real(name)
    )
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: ehrplan {' '.join(argv[:2] if argv[0] == 'data' else argv[:1])} needs the "
        "'train' extra (missing: torch, pyarrow); install it with: pip install 'ehrplan[train]'"
    ]


def test_a_missing_module_of_the_extra_met_later_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(name: str) -> None:
        raise ModuleNotFoundError("No module named 'numpy'", name="numpy")

    monkeypatch.setattr(app_module, "load_command", boom)
    with pytest.raises(SystemExit) as exit_:
        main(["estimate"])
    assert exit_.value.code == 2
    assert "pip install 'ehrplan[train]'" in capsys.readouterr().err


def test_version_and_short_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"ehrplan {__version__}"
    with pytest.raises(SystemExit) as exit_:
        main(["-h"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


_MODULES_AFTER = """
import json, sys
from ehrplan.cli.app import main
try:
    main({argv!r})
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.startswith(("ehrplan", "pydantic")))))
"""


def _modules_after(argv: list[str]) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", _MODULES_AFTER.format(argv=argv)],
        capture_output=True, text=True, check=True, cwd=REPO,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_imports_no_command_module() -> None:
    loaded = _modules_after(["--help"])
    assert not [m for m in loaded if m.startswith(("ehrplan.cli.", "ehrplan.plan", "pydantic"))
                and m not in ("ehrplan.cli.app", "ehrplan.cli.extras")], loaded  # fmt: skip


def test_estimate_json_imports_its_own_module_only() -> None:
    loaded = _modules_after(["estimate", "--preset", "tiny", "--json"])
    assert "ehrplan.cli.estimate" in loaded
    others = {f"ehrplan.cli.{c.module}" for n, c in COMMANDS.items() if n != "estimate"}
    assert not others & set(loaded), sorted(others & set(loaded))
    assert not [m for m in loaded if m.startswith("ehrplan.runtime")]


def test_ctrl_c_in_any_command_is_one_line_and_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Typer turns a KeyboardInterrupt into a silent exit 130; every command says it stopped."""
    from ehrplan.cli import estimate as estimate_cli

    def ctrl_c(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(estimate_cli, "estimate_memory", ctrl_c)
    code = app_module.run(["estimate", "--preset", "tiny-lstm", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 130 and err == "interrupted\n"
