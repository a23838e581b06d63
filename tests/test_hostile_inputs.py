"""Runs the hostile-input matrix (`tests/hostile/`): every case must end in the user-error contract."""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
from pathlib import Path

import pytest

import tests.hostile as hostile
from tests.conftest import one_line_error
from tests.hostile import Case, Ctx


def _all_cases() -> list[Case]:
    cases: list[Case] = []
    for info in sorted(pkgutil.iter_modules(hostile.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"tests.hostile.{info.name}")
        cases += [c for c in getattr(module, "CASES", [])]
    ids = [c.id for c in cases]
    duplicates = {i for i in ids if ids.count(i) > 1}
    assert not duplicates, f"duplicate case ids: {sorted(duplicates)}"
    return cases


CASES = _all_cases()


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under `root` with a digest of its bytes (folders as 'dir')."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + str(p.readlink())
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_the_matrix_is_large_and_covers_every_command():
    assert len(CASES) >= 150
    commands = {c.argv[0] for c in CASES}
    bench_forms = {c.argv[1] for c in CASES if c.argv[0] == "bench" and c.argv[1] in ("score", "report")}
    assert {"generate", "bench", "finetune", "trace", "info", "data", "init-model", "decoders", "serve"} <= commands
    assert bench_forms == {"score", "report"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, cli, tmp_path, tiny_llada, tiny_dream, monkeypatch):
    work = tmp_path / "case"
    work.mkdir()
    monkeypatch.chdir(work)  # default output folders (bench-results) land here, inside the snapshot
    ctx = Ctx(tmp=work, model=tiny_llada, dream=tiny_dream, cli=cli)
    if case.setup:
        case.setup(ctx)
    before, model_before = snapshot(work), snapshot(tiny_llada)
    argv = [a.format(**ctx.vars()) for a in case.argv]
    proc = cli(*argv, env=case.env)
    line = one_line_error(proc)
    assert case.expect in line, line
    assert line.rstrip().endswith(")"), f"no hint on how to fix it: {line}"
    assert proc.stdout == "", proc.stdout
    assert snapshot(work) == before, "the command changed files in its folder"
    assert snapshot(tiny_llada) == model_before
