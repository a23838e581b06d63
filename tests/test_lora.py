"""PEFT LoRA adapters merged at load: the scaling rules, and partial matches reported."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from evotok_cli.errors import CheckpointError
from evotok_cli.runtime.model import inspect_model, load_model


def write_adapter(folder, tensors: dict, **config):
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none"}
    cfg.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def lora_pair(module: str, r: int, d_in: int = 64, d_out: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prefix = f"base_model.model.{module}"
    return {f"{prefix}.lora_A.weight": torch.randn(r, d_in, generator=g),
            f"{prefix}.lora_B.weight": torch.randn(d_out, r, generator=g)}


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_scaling(tmp_path, tiny_llada, rslora):
    module = "model.transformer.blocks.1.q_proj"
    tensors = lora_pair(module, r=4)
    adapter = write_adapter(tmp_path / "a", tensors, r=4, lora_alpha=8, use_rslora=rslora)
    base = load_model(tiny_llada).net.get_submodule(module).weight
    merged = load_model(tiny_llada, adapter=adapter)
    scale = 8 / (math.sqrt(4) if rslora else 4)
    a, b = tensors[f"base_model.model.{module}.lora_A.weight"], tensors[f"base_model.model.{module}.lora_B.weight"]
    assert torch.allclose(merged.net.get_submodule(module).weight, base + scale * b @ a, atol=1e-5)


def test_rank_and_alpha_patterns(tmp_path, tiny_llada):
    q, v = "model.transformer.blocks.0.q_proj", "model.transformer.blocks.0.v_proj"
    tensors = {**lora_pair(q, r=2, seed=1), **lora_pair(v, r=4, seed=2)}
    adapter = write_adapter(tmp_path / "a", tensors, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                            rank_pattern={"q_proj": 2}, alpha_pattern={"q_proj": 6})
    base = load_model(tiny_llada).net
    merged = load_model(tiny_llada, adapter=adapter).net
    a, b = tensors[f"base_model.model.{q}.lora_A.weight"], tensors[f"base_model.model.{q}.lora_B.weight"]
    assert torch.allclose(merged.get_submodule(q).weight, base.get_submodule(q).weight + (6 / 2) * b @ a, atol=1e-5)


def test_partial_matches_are_reported(tmp_path, tiny_llada):
    tensors = lora_pair("model.transformer.blocks.0.q_proj", r=4)
    adapter = write_adapter(tmp_path / "a", tensors, target_modules=["q_proj", "o_proj"])
    report = load_model(tiny_llada, adapter=adapter).adapter
    assert report.unmatched_targets == ["o_proj"]
    assert "target 'o_proj' matches no module of this model" in report.partial
    assert "q_proj: 1 of 2 modules adapted" in report.partial
    info = inspect_model(tiny_llada, adapter=adapter)  # `evotok info` shows it without loading weights
    assert info["adapter"]["matched"] == {"q_proj": 1} and len(info["adapter"]["notes"]) == 2


def test_evotoken_and_d2f_adapter_layouts(tmp_path, tiny_llada):
    """The EvoToken LoRA (q/k/v) and D2F LoRA (q/k/v/attn_out) key layouts merge fully."""
    for name, targets in (("evotoken", ["q_proj", "k_proj", "v_proj"]),
                          ("d2f", ["q_proj", "k_proj", "v_proj", "attn_out"])):
        tensors = {}
        for layer in range(2):
            for t in targets:
                tensors.update(lora_pair(f"model.transformer.blocks.{layer}.{t}", r=4, seed=layer))
        adapter = write_adapter(tmp_path / name, tensors, target_modules=targets)
        report = load_model(tiny_llada, adapter=adapter).adapter
        assert report.merged_modules == 2 * len(targets) and report.partial == []


def test_wrongly_sized_adapter_is_a_clear_error(cli, tmp_path, tiny_llada):
    from tests.conftest import one_line_error
    tensors = lora_pair("model.transformer.blocks.0.q_proj", r=4, d_in=32)
    adapter = write_adapter(tmp_path / "a", tensors)
    line = one_line_error(cli("generate", "-m", str(tiny_llada), "--adapter", str(adapter), "-p", "hi",
                              "--gen-length", "8", "--block-length", "4", "--steps", "4"))
    assert "do not fit weight" in line and "another size" in line


def test_info_flags_an_adapter_that_matches_nothing(cli, tmp_path, tiny_llada):
    """`evotok info` shows what `--adapter` would refuse, in the table and in --json, and exits 0."""
    adapter = write_adapter(tmp_path / "a", lora_pair("model.transformer.blocks.0.q_proj", r=4),
                            target_modules=["o_proj", "gate_proj"])
    facts = json.loads(cli("info", str(tiny_llada), "--adapter", str(adapter), "--json").stdout)
    assert facts["adapter"]["matches_nothing"] is True
    assert facts["adapter"]["unmatched_targets"] == ["o_proj", "gate_proj"]
    table = cli("info", str(tiny_llada), "--adapter", str(adapter))
    assert table.returncode == 0 and "MATCHES NOTHING" in table.stdout
    with pytest.raises(CheckpointError, match="matches nothing"):
        load_model(tiny_llada, adapter=adapter)


def test_info_does_not_flag_a_partial_adapter(cli, tmp_path, tiny_llada):
    adapter = write_adapter(tmp_path / "a", lora_pair("model.transformer.blocks.0.q_proj", r=4))
    facts = json.loads(cli("info", str(tiny_llada), "--adapter", str(adapter), "--json").stdout)
    assert facts["adapter"]["matches_nothing"] is False and facts["adapter"]["matched"] == {"q_proj": 1}


def test_rank_is_read_from_the_config_not_the_tensors(tmp_path, tiny_llada):
    """Scaling uses adapter_config.json's r (as PEFT does); tensors of another rank are refused, not
    merged at alpha / (their rank)."""
    module = "model.transformer.blocks.0.q_proj"
    good = write_adapter(tmp_path / "good", lora_pair(module, r=4), r=4, lora_alpha=8)
    merged = load_model(tiny_llada, adapter=good).net.get_submodule(module).weight
    bad = write_adapter(tmp_path / "bad", lora_pair(module, r=4), r=2, lora_alpha=8)
    with pytest.raises(CheckpointError, match="lora_A has rank 4, but adapter_config.json says r=2"):
        load_model(tiny_llada, adapter=bad)
    assert torch.equal(load_model(tiny_llada, adapter=good).net.get_submodule(module).weight, merged)
