"""The layering of docs/architecture.md, enforced: every module of evotok_cli/ and plugins/evotok_plugins/
imports only from its own layer and the layers below it (imports inside functions and under TYPE_CHECKING
count too), and no two modules import each other, directly or round a loop.

The layers are read from the folders: each layer folder's `__init__.py` docstring has a line
`Layer N, name: ...` (a module directly in evotok_cli/ declares its own). docs/architecture.md's layer
table must say the same, so the tree, the picture and the rule cannot drift apart. A new top-level
module or folder must declare its layer before this test passes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = {"evotok_cli": "evotok_cli", "plugins/evotok_plugins": "evotok_plugins"}  # folder -> import name
DECLARATION = re.compile(r"^Layer (\d+), (\w+):", re.M)


def declared(source: str) -> tuple[int, str] | None:
    """The `Layer N, name:` line of a module's docstring, if it has one."""
    try:
        doc = ast.get_docstring(ast.parse(source)) or ""
    except SyntaxError:
        return None
    found = DECLARATION.search(doc)
    return (int(found.group(1)), found.group(2)) if found else None


def folder_layers(files: dict[str, str]) -> dict[str, tuple[int, str]]:
    """Path -> layer, as the tree declares it: a folder's declaration (its `__init__.py`) covers everything
    under it; evotok_cli itself is split into layer folders, so its direct modules each declare their own."""
    table: dict[str, tuple[int, str]] = {}
    for path, source in files.items():
        found = declared(source)
        if found is None:
            continue
        root = next(folder for folder in PACKAGES if path.startswith(folder + "/"))
        inner = path[len(root) + 1:]
        if inner.endswith("__init__.py") and (root != "evotok_cli" or "/" in inner):
            table[path.removesuffix("__init__.py")] = found
        else:
            table[path] = found
    return table


def layer_table(markdown: str) -> dict[str, tuple[int, str]]:
    """Path (a file, or a folder ending in "/") -> (rank, layer name), from the rows of the doc's layer
    table: `| rank | layer | what it holds | paths |`, the paths in backticks."""
    table: dict[str, tuple[int, str]] = {}
    for rank, name, paths in re.findall(r"^\|\s*(\d+)\s*\|\s*(\w+)\s*\|.*\|([^|]*)\|\s*$", markdown, re.M):
        for path in re.findall(r"`([^`]+)`", paths):
            table[path] = (int(rank), name)
    return table


def module_name(path: str) -> str:
    """`plugins/evotok_plugins/d2f/decoder.py` -> `evotok_plugins.d2f.decoder`."""
    folder = next(f for f in PACKAGES if path.startswith(f + "/"))
    parts = [PACKAGES[folder], *path[len(folder) + 1:].removesuffix(".py").split("/")]
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
    problems = [f"{p}: in no layer (no `Layer N, name:` line in its folder's __init__)" for p in files
                if layer(p) is None]
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
    found = folder_layers(source_files())
    assert len({rank for rank, _ in found.values()}) >= 8, "the layer folders lost their declarations"
    return found


def test_the_doc_table_and_the_folders_agree(table):
    """docs/architecture.md's table names exactly the folders and files that declare a layer, with the
    same rank and name."""
    doc = layer_table(DOC.read_text(encoding="utf-8"))
    assert doc == table


def test_every_layer_folder_says_what_it_may_import(table):
    for path in table:
        source = (ROOT / (path + "__init__.py" if path.endswith("/") else path)).read_text(encoding="utf-8")
        line = DECLARATION.search(ast.get_docstring(ast.parse(source)) or "")
        rest = (ast.get_docstring(ast.parse(source)) or "")[line.end():].strip()
        assert rest.startswith(("may import", "this module imports nothing")), f"{path}: {rest[:60]!r}"


def test_every_module_imports_only_its_layer_and_below(table):
    problems, _ = check(source_files(), table)
    assert not problems, "\n".join(problems)


def test_no_module_imports_round_a_loop(table):
    _, graph = check(source_files(), table)
    loops = cycles(graph)
    assert not loops, "modules that import each other: " + "; ".join(", ".join(group) for group in loops)


def test_the_checker_finds_a_planted_upward_import():
    """The check itself, on a synthetic tree: layers come from the folders' declarations, an upward
    import inside a function is found, a relative import is resolved, an import by the folder's name is
    refused, a module outside every declared folder is found, and a loop is found."""
    files = {
        "evotok_cli/__init__.py": '"""Layer 0, base: this module imports nothing."""',
        "evotok_cli/base/__init__.py": '"""Base.\n\nLayer 0, base: may import only base."""',
        "evotok_cli/base/errors.py": "",
        "evotok_cli/runtime/__init__.py": '"""Layer 1, runtime: may import base."""',
        "evotok_cli/runtime/model.py": "def f():\n    from evotok_cli.training.trainer import Trainer\n",
        "evotok_cli/training/__init__.py": '"""Layer 5, training: may import runtime."""',
        "evotok_cli/training/trainer.py": "from ..runtime import model\nfrom . import data\n",
        "evotok_cli/training/data.py": "from evotok_cli.training import trainer\nfrom evotok_cli.base.errors import E\n",
        "evotok_cli/brand_new.py": "",
        "evotok_cli/loose/__init__.py": "",
        "evotok_cli/loose/thing.py": "",
        "plugins/evotok_plugins/__init__.py": '"""Layer 3, plugins: may import decoding."""',
        "plugins/evotok_plugins/d2f/decoder.py": "from plugins.hard_mask import X\nfrom ..hard_mask import decoder\n",
        "plugins/evotok_plugins/hard_mask/decoder.py": "from evotok_cli.base.errors import E\n",
    }
    planted = folder_layers(files)
    assert planted["evotok_cli/runtime/"] == (1, "runtime") and planted["plugins/evotok_plugins/"] == (3, "plugins")
    assert planted["evotok_cli/__init__.py"] == (0, "base") and "evotok_cli/" not in planted
    problems, graph = check(files, planted)
    assert problems == [
        "evotok_cli/brand_new.py: in no layer (no `Layer N, name:` line in its folder's __init__)",
        "evotok_cli/loose/__init__.py: in no layer (no `Layer N, name:` line in its folder's __init__)",
        "evotok_cli/loose/thing.py: in no layer (no `Layer N, name:` line in its folder's __init__)",
        "evotok_cli/runtime/model.py:2 (runtime) imports evotok_cli.training.trainer (training), a layer above",
        "plugins/evotok_plugins/d2f/decoder.py:1 imports plugins.hard_mask.X: the installed name is evotok_plugins",
    ]
    assert graph["evotok_cli.training.trainer"] == {"evotok_cli.runtime.model", "evotok_cli.training.data"}
    assert graph["evotok_plugins.d2f.decoder"] == {"evotok_plugins.hard_mask.decoder"}
    assert cycles(graph) == [["evotok_cli.runtime.model", "evotok_cli.training.data", "evotok_cli.training.trainer"]]


MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60  # issue 29: a module or function a reader takes in at once


def oversized(files: dict[str, str]) -> list[str]:
    """Modules over MAX_FILE_LINES lines and functions over MAX_FUNCTION_LINES (decorators not counted)."""
    found = []
    for path, source in files.items():
        if source.count("\n") > MAX_FILE_LINES:
            found.append(f"{path}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source, filename=path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{path}:{node.lineno} {node.name}: {length} lines")
    return found


def test_no_module_or_function_is_too_long_to_read_at_once():
    assert not oversized(source_files()), "\n".join(oversized(source_files()))


def test_the_length_check_finds_a_planted_long_function():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert oversized({"m.py": f"def ok():\n    pass\n\n\ndef long():\n{body}\n"}) == [f"m.py:5 long: {MAX_FUNCTION_LINES + 1} lines"]
    assert oversized({"big.py": "x = 1\n" * (MAX_FILE_LINES + 1)}) == [f"big.py: {MAX_FILE_LINES + 1} lines"]
