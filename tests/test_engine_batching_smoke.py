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
