"""The torch line: nothing `ehrplan.plan` imports reaches torch, numpy or pyarrow.

A static walk over the source (no module is imported): every ``import`` statement of every module
of `ehrplan.plan`, at module level or inside a function, followed through every ehrplan module it
reaches. A function-level import counts: it runs when the planner calls that function. The
packages above a module reached (``ehrplan``, ``ehrplan.plan``) run their ``__init__`` first,
so their module-level imports count too; their functions are not called by importing a module
below them (``ehrplan.__getattr__`` loads the model classes, and torch, only when a user asks
``ehrplan`` for one). The subprocess tests in `test_cli_core.py` check the commands themselves
at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ehrplan"
FORBIDDEN = {"torch", "numpy", "pyarrow"}


def _source(module: str) -> Path | None:
    """The file of an ehrplan module or package, or None when no such module exists."""
    base = PACKAGE.parent.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _statements(tree: ast.Module, in_functions: bool) -> list[ast.AST]:
    """Every node of ``tree``, or (``in_functions=False``) those that run on import."""
    if in_functions:
        return list(ast.walk(tree))
    nodes: list[ast.AST] = []
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        nodes.append(node)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))
    return nodes


def _imports(module: str, path: Path, in_functions: bool = True) -> set[str]:
    """Every module named by an import statement in ``path`` (relative ones resolved): anywhere,
    or only where it runs on import (``in_functions=False``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _statements(ast.parse(path.read_text(), str(path)), in_functions):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            # `from pkg import name` imports the submodule pkg.name when there is one
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def forbidden_chains(start: list[str]) -> list[list[str]]:
    """Import chains from ``start`` to a forbidden module: [start, ..., forbidden]."""
    chains: list[list[str]] = []
    seen: set[tuple[str, bool]] = set()
    # (chain, module, whole): whole=False for a package reached as the parent of a module
    stack: list[tuple[list[str], str, bool]] = []

    def reach(chain: list[str], module: str) -> None:
        stack.append(([*chain, module], module, True))
        stack.extend(([*chain, f"{p} (above {module})"], p, False) for p in _parents(module))

    for module in start:
        reach([], module)
    while stack:
        chain, module, whole = stack.pop()
        if (module, whole) in seen:
            continue
        seen.add((module, whole))
        path = _source(module)
        if path is None:
            continue
        for name in sorted(_imports(module, path, in_functions=whole)):
            if name.partition(".")[0] in FORBIDDEN:
                chains.append([*chain, name])
            elif name.partition(".")[0] == "ehrplan":
                reach(chain, name)
    return chains


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _plan_modules() -> list[str]:
    return sorted(
        "ehrplan.plan" if p.name == "__init__.py" else f"ehrplan.plan.{p.stem}"
        for p in (PACKAGE / "plan").glob("*.py")
    )


def test_the_planning_package_reaches_no_torch_numpy_or_pyarrow() -> None:
    modules = _plan_modules()
    assert "ehrplan.plan.estimator" in modules and "ehrplan.plan.config" in modules
    chains = forbidden_chains(modules)
    assert not chains, "\n".join(" -> ".join(c) for c in chains)


@pytest.mark.parametrize("module", ["ehrplan.runtime.measure", "ehrplan.data.meds"])
def test_the_walk_finds_the_runtimes_imports(module: str) -> None:
    # the same walk from the torch side must reach the forbidden modules, or it proves nothing
    assert forbidden_chains([module])


def test_the_walk_follows_function_level_and_relative_imports(tmp_path: Path) -> None:
    src = "import json\ndef f():\n    from . import units\n    import numpy.linalg\n"
    path = _write(tmp_path / "x.py", src)
    assert {"json", "ehrplan.plan.units", "numpy.linalg"} <= _imports("ehrplan.plan.x", path)
    # what a package above runs on import: not its functions' imports
    assert _imports("ehrplan.plan.x", path, in_functions=False) == {"json"}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
