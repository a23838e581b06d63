"""The layering of docs/architecture.md, enforced: every module of evotok_cli/ and plugins/ imports only
from its own layer and the layers below it (imports inside functions and under TYPE_CHECKING count
too), and no two modules import each other, directly or round a loop.

The layer table is read from docs/architecture.md itself, so the picture and the rule cannot drift
apart. A new module must be placed in a layer there before this test passes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = {"evotok_cli": "evotok_cli", "plugins": "evotok_plugins"}  # folder -> installed import name


def layer_table(markdown: str) -> dict[str, tuple[int, str]]:
    """Path (a file, or a folder ending in "/") -> (rank, layer name), from the rows of the doc's layer
    table: `| rank | layer | what it holds | paths |`, the paths in backticks."""
    table: dict[str, tuple[int, str]] = {}
    for rank, name, paths in re.findall(r"^\|\s*(\d+)\s*\|\s*(\w+)\s*\|.*\|([^|]*)\|\s*$", markdown, re.M):
        for path in re.findall(r"`([^`]+)`", paths):
            table[path] = (int(rank), name)
    return table


def module_name(path: str) -> str:
    """`plugins/d2f/__init__.py` -> `evotok_plugins.d2f`."""
    parts = path.removesuffix(".py").split("/")
    parts[0] = PACKAGES[parts[0]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: str, source: str, known: set[str]) -> list[tuple[str, int]]:
    """(module, line) for every import of `known` modules in one file, relative ones resolved; an import
    of a name inside a module counts as an import of that module."""
    me = module_name(path).split(".")
    package = me if path.endswith("__init__.py") else me[:-1]
    found = []
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()
            if parts:
                found.append((".".join(parts), node.lineno))
            elif target.split(".")[0] == "plugins":
                found.append((target, node.lineno))  # the folder's name is not an installed package
    return found


def check(files: dict[str, str], table: dict[str, tuple[int, str]]) -> tuple[list[str], dict[str, set[str]]]:
    """The layering problems of a set of modules (path -> source) and their import graph."""
    def layer(path: str) -> tuple[int, str] | None:
        matches = [p for p in table if path == p or (p.endswith("/") and path.startswith(p))]
        return table[max(matches, key=len)] if matches else None

    paths = {module_name(p): p for p in files}
    problems = [f"{p}: in no layer of docs/architecture.md's table" for p in files if layer(p) is None]
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for path, source in files.items():
        mine = layer(path)
        for target, line in imports(path, source, set(paths)):
            if target not in paths:
                problems.append(f"{path}:{line} imports {target}: the installed name is evotok_plugins")
                continue
            if target == module_name(path):
                continue
            graph[module_name(path)].add(target)
            theirs = layer(paths[target])
            if mine and theirs and theirs[0] > mine[0]:
                problems.append(f"{path}:{line} ({mine[1]}) imports {target} ({theirs[1]}), a layer above")
    return problems, graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other round a loop (strongly connected, two or more)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def source_files() -> dict[str, str]:
    return {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8")
            for folder in PACKAGES for p in sorted((ROOT / folder).rglob("*.py"))}


@pytest.fixture(scope="module")
def table() -> dict[str, tuple[int, str]]:
    found = layer_table(DOC.read_text(encoding="utf-8"))
    assert len({rank for rank, _ in found.values()}) >= 5, "docs/architecture.md lost its layer table"
    return found


def test_every_module_imports_only_its_layer_and_below(table):
    problems, _ = check(source_files(), table)
    assert not problems, "\n".join(problems)


def test_no_module_imports_round_a_loop(table):
    _, graph = check(source_files(), table)
    loops = cycles(graph)
    assert not loops, "modules that import each other: " + "; ".join(", ".join(group) for group in loops)


def test_the_checker_finds_a_planted_upward_import(table):
    """The check itself, on a synthetic tree: an upward import inside a function is found, a relative
    import is resolved, an import by the folder's name is refused, and a loop is found."""
    files = {
        "evotok_cli/__init__.py": "",
        "evotok_cli/errors.py": "",
        "evotok_cli/runtime/__init__.py": "",
        "evotok_cli/runtime/model.py": "def f():\n    from evotok_cli.training.trainer import Trainer\n",
        "evotok_cli/training/__init__.py": "",
        "evotok_cli/training/trainer.py": "from ..runtime import model\nfrom . import data\n",
        "evotok_cli/training/data.py": "from evotok_cli.training import trainer\nfrom evotok_cli.errors import E\n",
        "plugins/__init__.py": "",
        "plugins/d2f/__init__.py": "from plugins.hard_mask import X\nfrom .. import hard_mask\n",
        "plugins/hard_mask/__init__.py": "from evotok_cli.errors import E\n",
    }
    problems, graph = check(files, table)
    assert problems == [
        "evotok_cli/runtime/model.py:2 (runtime) imports evotok_cli.training.trainer (training), a layer above",
        "plugins/d2f/__init__.py:1 imports plugins.hard_mask.X: the installed name is evotok_plugins",
    ]
    assert graph["evotok_cli.training.trainer"] == {"evotok_cli.runtime.model", "evotok_cli.training.data"}
    assert graph["evotok_plugins.d2f"] == {"evotok_plugins.hard_mask"}
    assert cycles(graph) == [["evotok_cli.runtime.model", "evotok_cli.training.data", "evotok_cli.training.trainer"]]
    assert check({"evotok_cli/brand_new.py": ""}, table)[0] == [
        "evotok_cli/brand_new.py: in no layer of docs/architecture.md's table"]
