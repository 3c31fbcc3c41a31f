"""The `train` extra: what the base install (the planner) lacks, and the one line that says so.

`pip install ehrplan` installs the planner only (presets, estimate, hardware, recommend,
validate); every other command makes tensors or reads parquet and needs
`pip install 'ehrplan[train]'`. `ehrplan.cli.app` checks before such a command runs, and maps a
missing module of the extra met anywhere else to the same line (exit 2).
"""

from __future__ import annotations

from importlib.util import find_spec

from ehrplan.errors import MissingExtraError

INSTALL_LINE = "pip install 'ehrplan[train]'"

#: The import names of the `train` extra in pyproject.toml (a test keeps the two equal).
TRAIN_MODULES: tuple[str, ...] = (
    "torch",
    "numpy",
    "pyarrow",
    "safetensors",
    "sklearn",
    "lifelines",
    "matplotlib",
)


def missing_train_modules() -> list[str]:
    """The modules of the `train` extra that cannot be found (none are imported)."""
    return [name for name in TRAIN_MODULES if find_spec(name) is None]


def missing_extra(command: str, missing: list[str]) -> MissingExtraError:
    """The one-line error for ``command`` run without the `train` extra."""
    return MissingExtraError(
        f"{command} needs the 'train' extra (missing: {', '.join(missing)}); "
        f"install it with: {INSTALL_LINE}"
    )


def require_train_extra(command: str) -> None:
    """Raise the one-line error when any module of the `train` extra is missing."""
    missing = missing_train_modules()
    if missing:
        raise missing_extra(command, missing)


def as_missing_extra(err: ModuleNotFoundError, command: str) -> MissingExtraError | None:
    """The one-line error when ``err`` is a module of the `train` extra, else None."""
    root = (err.name or "").partition(".")[0]
    if root in TRAIN_MODULES:
        return missing_extra(command, [root])
    return None
