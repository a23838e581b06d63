"""benchmarks/engine_batching.py runs end to end on the tiny model and finds one forward per engine step in
every decoder and cache mode (issue 25's target), so the script works before a quiet machine runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "engine_batching.py"


def test_every_mode_runs_one_forward_per_step(tiny_llada, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tiny_llada), "--requests", "3", "--gen-length",
                           "8", "--block-length", "4", "--steps", "4", "--min-prompt", "3", "--max-prompt", "9",
                           "--out", str(tmp_path), "--tag", "smoke"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "engine_batching-cpu-smoke.json").read_text())
    rows = {r["mode"]: r for r in doc["rows"]}
    assert set(rows) == {"hard-mask-none", "hard-mask-prefix", "hard-mask-dual", "evotoken-none", "evotoken-prefix",
                         "evotoken-dual", "d2f", "hard-mask-cfg"}
    assert all(r["forwards_per_step"] == 1.0 and r["requests"] == 3 and r["tokens_per_s"] > 0 for r in rows.values())
    assert "| forwards / step | host ms / step |" in (tmp_path / "engine_batching-cpu-smoke.md").read_text()


def test_count_reports_the_host_work_per_step_and_merging_cuts_it(tiny_llada, tmp_path):
    """`--count` adds host torch ops and Python calls per step; merged rows (the default) make fewer of both
    per step than rows that are programs of their own (`--no-merge`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    counted = {}
    for flag in ("", "--no-merge"):
        out = tmp_path / (flag or "merged")
        proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tiny_llada), "--requests", "6",
                               "--gen-length", "8", "--block-length", "4", "--steps", "4", "--min-prompt", "3",
                               "--max-prompt", "9", "--modes", "evotoken-dual", "--count", "--out", str(out),
                               *([flag] if flag else [])], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr
        counted[flag] = json.loads((out / "engine_batching-cpu.json").read_text())["rows"][0]
        assert "host torch ops / step" in (out / "engine_batching-cpu.md").read_text()
    merged, alone = counted[""], counted["--no-merge"]
    assert 0 < merged["ops_per_step"] < alone["ops_per_step"]
    assert 0 < merged["py_calls_per_step"] < alone["py_calls_per_step"]
