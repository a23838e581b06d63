"""The test session must not write into the source tree: a test that builds, installs or runs something
from the checkout leaves `build/`, `*.egg-info` or outputs behind (in CI's clean clone and in every
developer's), which hides what is tracked and can change what the next run imports.

Loaded by tests/conftest.py (`pytest_plugins`). A session fixture, used by every test, lists the
repository's paths before the first test and again after the last one, and names the paths the session
created: in CI (CI=true; a clean clone nobody edits) as an error at the last test's teardown, elsewhere as
a warning, since a checkout being edited while the tests run gains files (an editor's swap file, a new
module) that are not the tests' doing. Not counted: the version control and virtual environment folders
and tool caches (`__pycache__`, pytest's, hypothesis', ruff's), which are where they belong. Only new
paths count, for the same reason.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_COUNTED = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache", ".mypy_cache"}


def tree_paths(root: Path = ROOT) -> set[str]:
    """Every file and folder under root, relative, outside the folders that are not counted."""
    found: set[str] = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in NOT_COUNTED and not (Path(folder, d) / "pyvenv.cfg").exists()]
        rel = os.path.relpath(folder, root)
        found.update(os.path.normpath(os.path.join(rel, name)) for name in (*dirs, *files))
    return found


def outermost(paths: set[str]) -> list[str]:
    """The new paths without those inside another new path (a new `build/`, not each file in it)."""
    return sorted(p for p in paths if not any(parent in paths for parent in map(str, Path(p).parents)))


@pytest.fixture(scope="session", autouse=True)
def source_tree_unchanged():
    before = tree_paths()
    yield
    created = outermost(tree_paths() - before)
    if not created:
        return
    message = ("the tests wrote into the source tree (write under tmp_path instead; copy a folder from the "
               f"checkout to tmp_path before building it): {', '.join(created)}")
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(message, pytrace=False)
    warnings.warn(message, pytest.PytestWarning, stacklevel=1)
