"""docs/lm-eval.md's first run works as written on the bundled model (issue 31, item 6), and lm-eval's
header reports the batch size model_args set."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from evotok_cli.lmeval.__main__ import harness_batch_size

ROOT = Path(__file__).resolve().parents[1]


def first_run_commands() -> str:
    text = (ROOT / "docs" / "lm-eval.md").read_text(encoding="utf-8")
    section = text.split("## A first run on the bundled model", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.S)[0]


@pytest.mark.parametrize(("argv", "expected"), [
    (["--model_args", "model=x,batch_size=5"], ["--model_args", "model=x,batch_size=5", "--batch_size", "5"]),
    (["--model_args=steps=3,batch_size=4"], ["--model_args=steps=3,batch_size=4", "--batch_size", "4"]),
    (["--model_args", "batch_size=5", "--batch_size", "2"], ["--model_args", "batch_size=5", "--batch_size", "2"]),
    (["--model_args", "steps=5"], ["--model_args", "steps=5"]),
    (["--model_args", "batch_size=auto"], ["--model_args", "batch_size=auto"]),  # refused later, in one line
])
def test_model_args_batch_size_becomes_the_harness_batch_size(argv, expected):
    assert harness_batch_size(argv) == expected


@pytest.mark.slow
def test_the_first_run_runs_as_shown(tmp_path):
    script = first_run_commands()
    bin_dir = str(Path(sys.executable).parent)  # `evotok` and this python, as the reader's shell finds them
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env = {k: v for k, v in env.items() if not k.startswith("EVOTOK_")}
    proc = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("evotok ("))
    assert header.endswith("batch_size: 5"), header
    row = next(line for line in proc.stdout.splitlines() if line.startswith("|evotok_sudoku4"))
    assert "|boxed |" in row and "exact_match" in row
    value = float(row.split("|")[7])
    assert value >= 0.8, row  # the bundled model solves these puzzles (the README's is one of them)
