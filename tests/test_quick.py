"""The quick subset (tests/quick.py) covers every `evotok` command with a test that exists and runs it."""

from __future__ import annotations

import ast
from pathlib import Path

import typer

from tests.quick import INVOKES, QUICK

ROOT = Path(__file__).resolve().parents[1]


def commands() -> set[str]:
    """Every command of the `evotok` app, bench's subcommands as `bench score` / `bench report`."""
    from evotok_cli.cli.app import app

    group = typer.main.get_command(app)
    names = set()
    for name, command in group.commands.items():
        names.add(name)
        for sub in getattr(command, "commands", {}) or {}:
            if sub != "run":  # `bench TASK` is `bench run`
                names.add(f"{name} {sub}")
    return names


def test_every_command_has_a_quick_test():
    missing = sorted(commands() - set(QUICK))
    assert not missing, f"commands without a quick test in tests/quick.py: {missing}"


def test_each_quick_test_exists_and_invokes_its_command():
    for command, nodes in QUICK.items():
        assert nodes, command
        for node in nodes:
            path, name = node.split("::")
            tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
            functions = {f.name: f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
            assert name in functions, f"{node} (quick test of {command}) does not exist"
            source = ast.get_source_segment((ROOT / path).read_text(encoding="utf-8"), functions[name])
            needles = INVOKES.get(command, (f'"{command.split()[-1]}"',))
            assert any(n in source for n in needles), f"{node} never invokes `{command}` (no {' or '.join(needles)})"
