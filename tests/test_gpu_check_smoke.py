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


@pytest.mark.slow  # the compiled rows compile three graphs with inductor on the CPU: minutes when cold
def test_cpu_smoke_run_writes_results(tmp_path):
    proc = _run("--device", "cpu", "--layers", "1", "--hidden", "128", "--vocab", "256", "--gen-length", "32",
                "--block-length", "16", "--steps", "16", "--prompt-length", "8", "--quick", "--batch", "2",
                "--padded-batch", "3", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    [json_path] = tmp_path.glob("gpu_check-cpu*-quick.json")
    doc = json.loads(json_path.read_text())
    assert doc["schema"] == "evotok.gpu_check/1" and doc["bandwidth_gbs"] == 3350.0
    assert doc["bounds_source"].startswith("unknown device: H100 SXM figures assumed")
    assert [r["seq_len"] for r in doc["latency"]] == [16, 40]
    runs = {(r["decoder"], r["cache"], r["batch"], r["padded"], r["temperature"]): r for r in doc["decoders"]}
    plain = {("hard-mask", c, 1, False, 0.0) for c in ("none", "prefix", "dual")} | \
        {("evotoken", c, 1, False, 0.0) for c in ("none", "prefix", "dual")} | \
        {("d2f", "none", 1, False, 0.0), ("d2f", "blocks", 1, False, 0.0)}
    extra = {(d, "none", 2, False, 0.0) for d in ("hard-mask", "evotoken")} | \
        {(d, "none", 3, True, 0.0) for d in ("hard-mask", "evotoken")} | \
        {(d, "none", 1, False, 0.5) for d in ("hard-mask", "evotoken")}
    assert set(runs) == plain | extra
    assert all(not r.get("error") and r["nfe"] >= 1 and r["tokens_per_s"] > 0 for r in runs.values())
    # every row through the step engine, as generate, bench and serve: one forward per engine step
    assert all(r["forwards_per_step"] == pytest.approx(1.0) and r["host_ms_per_step"] > 0 for r in runs.values())
    assert runs[("hard-mask", "none", 1, False, 0.0)]["nfe"] == 16  # 2 blocks x 8 steps, 2 tokens per step
    assert runs[("hard-mask", "none", 2, False, 0.0)]["nfe"] == 16
    assert runs[("evotoken", "none", 3, True, 0.0)]["nfe"] == 16
    assert runs[("hard-mask", "none", 1, False, 0.5)]["nfe"] == 16
    assert doc["settings"]["padded_prompt_lengths"] == [4, 8, 12]
    targets = doc["targets"]
    assert set(targets) == {"evotoken_slowdown_vs_hard_mask", "hard-mask_prefix_speedup", "hard-mask_dual_speedup",
                            "evotoken_prefix_speedup", "evotoken_dual_speedup", "hard-mask_batch2_speedup",
                            "evotoken_batch2_speedup"}
    speed = {k[:3]: r["tokens_per_s"] for k, r in runs.items() if not k[3] and not k[4]}
    assert targets["hard-mask_batch2_speedup"] == pytest.approx(
        speed[("hard-mask", "none", 2)] / speed[("hard-mask", "none", 1)], rel=1e-2)
    compiled = doc["compiled"]
    assert compiled["error"] is None, compiled["error"]
    assert "max replays CUDA graphs, and cpu has none" in doc["compiled_max"]["error"]  # the CPU's honest row
    assert [r["mode"] for r in doc["quantized"]] == ["none", "int8", "int4"]
    assert [r["seq_len"] for r in compiled["latency"]] == [16, 40]
    assert all(r["ms"] > 0 and r["eager_ms"] > 0 and r["speedup"] > 0 for r in compiled["latency"])
    assert compiled["decoder"]["nfe"] == 16 and compiled["decoder"]["tokens_per_s"] > 0
    lora = doc["lora"]
    assert lora["modules"] == 3 and lora["rank"] == 16 and 5e-4 < lora["relative_delta"] < 2e-3
    assert lora["estimate"]["dtype"] == "bfloat16" and 0 <= lora["estimate"]["lost_if_merged"] <= 1
    assert lora["max_logit_diff"] < 0.01 * lora["max_logit_change_unmerged"]  # fp32: merged == unmerged
    assert lora["merged_keeps"] == pytest.approx(1.0, abs=0.05)
    assert lora["unmerged_ms"] > 0 and lora["merged_ms"] > 0
    text = json_path.with_suffix(".md").read_text()
    assert text.startswith("# GPU check: CPU") and "torch.compile" in text and "LoRA (random, r=16" in text
    assert "| hard-mask | none | 3 padded | 0 |" in text and "| evotoken | none | 1 | 0.5 |" in text
    assert "| forwards / step | host ms / step |" in text


def test_bandwidth_table():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from _gpu_rows import device_bounds
    finally:
        sys.path.remove(str(SCRIPT.parent))
    for name, label, gbs in (("NVIDIA H100 80GB HBM3", "H100 SXM", 3350), ("NVIDIA H100 PCIe", "H100 PCIe", 2000),
                             ("NVIDIA H100 NVL", "H100 NVL", 3900), ("NVIDIA H200", "H200", 4800),
                             ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM", 2039),
                             ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe", 1935),
                             ("NVIDIA A100-SXM4-40GB", "A100 40GB", 1555), ("NVIDIA L40S", "L40S", 864)):
        bounds = device_bounds(name, None, None)
        assert (bounds["bandwidth_gbs"], bounds["source"], bounds["known"]) == (gbs, f"table: {label}", True), name
    unknown = device_bounds("NVIDIA GeForce RTX 4090", None, None)
    assert unknown["known"] is False and "unknown device" in unknown["source"] and unknown["bandwidth_gbs"] == 3350
    flagged = device_bounds("NVIDIA H200", 4000.0, None)
    assert flagged["bandwidth_gbs"] == 4000 and flagged["peak_tflops"] == 989 and flagged["source"] == "flags (table: H200)"


def test_bad_bandwidth_is_one_line(tmp_path):
    proc = _run("--device", "cpu", "--bandwidth-gbs", "0", "--out", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: --bandwidth-gbs must be a positive number, got 0.0"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_no_cuda_is_one_line_telling_to_use_cpu(tmp_path):
    proc = _run("--out", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "--device cpu" in proc.stderr
    assert not list(tmp_path.iterdir())


def _quantized_rows_look_right(rows: list[dict]) -> None:
    """Each mode measured (bytes under issue 27's targets, shares in [0, 1]) or its one-line reason: this
    machine may lack bitsandbytes, which must then be named with how to install it."""
    assert [r["mode"] for r in rows] == ["none", "int8", "int4"]
    assert rows[0]["error"] is None and rows[0]["tokens_equal"] == 1.0 and rows[0]["linear_bytes"] > 0
    for row, target in zip(rows[1:], (0.55, 0.35)):
        if row["error"]:
            assert "bitsandbytes" in row["error"] and "pip install" in row["error"], row["error"]
            continue
        assert row["linear_ratio"] <= target and row["ms_per_forward"] > 0 and row["tokens_per_s"] > 0
        assert 0 <= row["tokens_equal"] <= 1 and 0 <= row["rows_equal"] <= 1


def test_cpu_run_without_compile_writes_the_quantized_rows(tmp_path):
    """--no-compile: the quickest end-to-end run, with the --quantize rows (issue 27, item 5) in JSON and
    Markdown."""
    proc = _run("--device", "cpu", "--layers", "1", "--hidden", "128", "--vocab", "256", "--gen-length", "16",
                "--block-length", "8", "--steps", "4", "--prompt-length", "6", "--quick", "--batch", "1",
                "--padded-batch", "1", "--decoders", "hard-mask", "--no-compile", "--quantize-prompts", "3",
                "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    [json_path] = tmp_path.glob("gpu_check-cpu*-quick.json")
    doc = json.loads(json_path.read_text())
    assert "compiled" not in doc and "compiled_max" not in doc and doc["settings"]["quantize_prompts"] == 3
    _quantized_rows_look_right(doc["quantized"])
    text = json_path.with_suffix(".md").read_text()
    assert "--quantize (bitsandbytes, block linears only)" in text and "| int4 |" in text


def test_compile_max_row_on_the_cpu_records_the_refusal(tiny_llada):
    """The --compile max row runs evotok's own check first: on a CPU it records the one-line refusal (no
    compile is attempted, so this is quick) and leaves the model eager."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from _gpu_rows import compiled_rows
    finally:
        sys.path.remove(str(SCRIPT.parent))
    from evotok_cli.runtime.model import load_model

    model = load_model(tiny_llada)
    row = compiled_rows(model, [8], model.vocab_size, model.device, 1, {8: 1.0}, lambda m: {}, level="max")
    assert row["level"] == "max" and row["latency"] == [] and row["decoder"] is None
    assert row["error"].startswith("ConfigError: --compile: max replays CUDA graphs, and cpu has none")
    assert model.compiled is False


def test_help_lists_the_new_rows():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--no-compile", "--no-quantize", "--quantize-prompts"):
        assert flag in proc.stdout
