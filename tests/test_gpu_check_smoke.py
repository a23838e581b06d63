"""benchmarks/gpu_check.py runs end to end on a CPU at toy size and writes its JSON and Markdown, so the
script is known to work before anyone spends GPU time on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def test_cpu_smoke_run_writes_results(tmp_path):
    proc = _run("--device", "cpu", "--layers", "1", "--hidden", "128", "--vocab", "256", "--gen-length", "32",
                "--block-length", "16", "--steps", "16", "--prompt-length", "8", "--quick", "--batch", "2",
                "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    [json_path] = tmp_path.glob("gpu_check-cpu*-quick.json")
    doc = json.loads(json_path.read_text())
    assert doc["schema"] == "evotok.gpu_check/1" and doc["bandwidth_gbs"] == 3350.0
    assert [r["seq_len"] for r in doc["latency"]] == [16, 40]
    runs = {(r["decoder"], r["cache"], r["batch"]): r for r in doc["decoders"]}
    assert set(runs) == {("hard-mask", c, 1) for c in ("none", "prefix", "dual")} | \
        {("evotoken", c, 1) for c in ("none", "prefix", "dual")} | {("d2f", "none", 1), ("d2f", "blocks", 1)} | \
        {("hard-mask", "none", 2), ("evotoken", "none", 2)}
    assert all(not r.get("error") and r["nfe"] >= 1 and r["tokens_per_s"] > 0 for r in runs.values())
    assert runs[("hard-mask", "none", 1)]["nfe"] == 16  # 2 blocks x 8 steps, 2 tokens per step
    assert runs[("hard-mask", "none", 2)]["nfe"] == 16
    targets = doc["targets"]
    assert set(targets) == {"evotoken_slowdown_vs_hard_mask", "hard-mask_prefix_speedup", "hard-mask_dual_speedup",
                            "evotoken_prefix_speedup", "evotoken_dual_speedup", "hard-mask_batch2_speedup",
                            "evotoken_batch2_speedup"}
    speed = {k: r["tokens_per_s"] for k, r in runs.items()}
    assert targets["hard-mask_batch2_speedup"] == pytest.approx(
        speed[("hard-mask", "none", 2)] / speed[("hard-mask", "none", 1)], rel=1e-2)
    assert json_path.with_suffix(".md").read_text().startswith("# GPU check: CPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_no_cuda_is_one_line_telling_to_use_cpu(tmp_path):
    proc = _run("--out", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "--device cpu" in proc.stderr
    assert not list(tmp_path.iterdir())
