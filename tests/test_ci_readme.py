""".ci/run runs README.md's two commands (install and decode; install the test extra and test) exactly as
README writes them, so that an install step README leaves out fails CI instead of passing unnoticed."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKERS = {"first command": 0, "test command": 1}  # .ci/run's marker -> README's bash block under "Set up and run"


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_ci_runs_readme_commands_verbatim():
    commands = readme_commands()
    assert len(commands) >= 2 and all("\n" not in c for c in commands[:2]), commands
    assert commands[0].startswith("pip install torch==2.13.0 && pip install -e . && evotok generate ")
    assert "python -m pytest" in commands[1]
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    for name, index in MARKERS.items():
        marker = f"# --- README: {name} (keep in sync) ---"
        assert lines.count(marker) == 1, f".ci/run lacks the marker {marker!r}"
        assert lines[lines.index(marker) + 1] == commands[index], f"README's {name} differs from .ci/run's"
    first, test = (lines.index(f"# --- README: {n} (keep in sync) ---") for n in MARKERS)
    assert first < test  # the plain install is proven before the test extra installs the rest
