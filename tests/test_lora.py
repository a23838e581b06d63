"""PEFT LoRA adapters merged at load: the scaling rules, and partial matches reported."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from evotok_cli.base.errors import CheckpointError
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


# -- unmerged adapters and the size of their deltas ------------------------------------------------------

def small_adapter(folder, scale: float, layers: int = 2, targets=("q_proj", "v_proj")):
    """q/v LoRA pairs on every layer, scaled so that ||dW|| / ||W|| is about 0.14 * scale."""
    tensors = {}
    for layer in range(layers):
        for t in targets:
            pair = lora_pair(f"model.transformer.blocks.{layer}.{t}", r=4, seed=layer)
            tensors.update({k: v * scale for k, v in pair.items()})
    return write_adapter(folder, tensors, target_modules=list(targets))


def test_unmerged_logits_equal_merged_in_fp32(tmp_path, tiny_llada):
    """fp32 (no rounding issue): W x + s B A x and (W + s B A) x are the same sums in another order, so the
    logits agree to fp32 rounding (~1e-6 relative, through two layers of std-0.3 weights: atol 1e-4 on
    logits of size ~10)."""
    from evotok_cli.runtime.lora import LoRALinear

    adapter = small_adapter(tmp_path / "a", scale=0.1)
    merged = load_model(tiny_llada, adapter=adapter, lora_mode="merged")
    unmerged = load_model(tiny_llada, adapter=adapter, lora_mode="unmerged")
    assert merged.adapter.mode == "merged" and unmerged.adapter.mode == "unmerged"
    assert isinstance(unmerged.net.get_submodule("model.transformer.blocks.1.v_proj"), LoRALinear)
    assert unmerged.net.state_dict().keys() == merged.net.state_dict().keys()  # names and count kept
    assert unmerged.parameter_count() == merged.parameter_count()
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, base = merged.net(ids), unmerged.net(ids), load_model(tiny_llada).net(ids)
    assert (a - base).abs().max() > 1e-2  # the adapter does change the logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)


def test_rounding_estimate_on_a_constructed_case():
    """W = 1 everywhere: a bf16 step above 1 is 2^-7, so a +0.001 delta rounds away and +0.01 lands on
    1 + 2^-7 (kept, with an error of 2^-7 - 0.01)."""
    from evotok_cli.runtime.lora import LoRAPair, delta_stats

    w = torch.ones(4, 4)
    delta = torch.tensor([[0.001, 0.01] * 2] * 4)  # half the entries lost
    pair = LoRAPair("m", torch.nn.Linear(4, 4, bias=False), a=torch.eye(4), b=delta, scaling=1.0)
    stats = delta_stats([pair], lambda p: w, torch.bfloat16)
    assert stats.lost == 0.5 and stats.dtype == "bfloat16"
    assert stats.relative == pytest.approx(float(delta.norm() / w.norm()))
    lost2, kept2 = 0.001 ** 2, (2 ** -7 - 0.01) ** 2
    assert stats.error == pytest.approx(math.sqrt((lost2 + kept2) / (0.001 ** 2 + 0.01 ** 2)), rel=1e-4)
    assert delta_stats([pair], lambda p: w, torch.float32).lost == 0.0  # fp32 keeps them
    zero = LoRAPair("z", torch.nn.Linear(4, 4, bias=False), a=torch.eye(4), b=torch.zeros(4, 4), scaling=1.0)
    assert delta_stats([zero], lambda p: w, torch.bfloat16).lost == 0.0  # a fresh adapter (B = 0) loses nothing


def test_unmerged_keeps_a_delta_that_a_bf16_merge_rounds_away():
    """One bf16 layer, a delta of 0.1% of W: a merge keeps about half of what the adapter adds to the
    outputs (projected on the exact fp32 change, over 512 tokens); unmerged keeps all of it, up to the
    bf16 rounding of the outputs, which averages out."""
    import torch.nn.functional as F

    from evotok_cli.runtime.lora import LoRALinear, LoRAPair, delta_stats

    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        base.weight.copy_(torch.randn(64, 64, generator=g) * 0.3)
    a, b = torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g) * 1.5e-4
    pair = LoRAPair("m", base, a, b, 1.0)
    delta = pair.delta()
    assert delta_stats([pair], lambda p: base.weight, torch.bfloat16).lost > 0.5
    x = torch.randn(512, 64, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        before = F.linear(x, base.weight).float()
        exact = x.float() @ delta.T  # what the adapter adds, in fp32
        merged = F.linear(x, (base.weight.float() + delta).to(torch.bfloat16)).float()
        unmerged = LoRALinear(base, a, b)(x).float()

    def kept(y: torch.Tensor) -> float:
        return float(((y - before) * exact).sum() / (exact * exact).sum())

    assert kept(merged) < 0.75 and abs(kept(unmerged) - 1) < 0.1


def test_auto_mode_and_the_bf16_merge_warning(tmp_path, tiny_llada):
    small, large = small_adapter(tmp_path / "small", scale=1e-2), small_adapter(tmp_path / "large", scale=1.0)
    with pytest.warns(UserWarning, match=r"merging the adapter into bfloat16 weights rounds away \d+% of its"):
        report = load_model(tiny_llada, adapter=small, dtype="bfloat16", lora_mode="merged").adapter
    assert report.mode == "merged" and report.delta.lost > 0.5
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto: no warning, it keeps the adapter beside the layers instead
        assert load_model(tiny_llada, adapter=small, dtype="bfloat16", lora_mode="auto").adapter.mode == "unmerged"
        assert load_model(tiny_llada, adapter=large, dtype="bfloat16", lora_mode="auto").adapter.mode == "merged"
        assert load_model(tiny_llada, adapter=small, lora_mode="auto").adapter.mode == "merged"  # fp32 loses nothing


def test_cli_warns_in_one_line_and_reports_the_mode(tmp_path, tiny_llada):
    from tests.conftest import run_cli

    adapter = small_adapter(tmp_path / "a", scale=1e-2)
    base = ["generate", "-m", str(tiny_llada), "--adapter", str(adapter), "-p", "hi", "--gen-length", "8",
            "--block-length", "4", "--steps", "4", "--dtype", "bfloat16", "--json"]
    proc = run_cli(*base, "--lora-mode", "merged")
    assert proc.returncode == 0, proc.stderr
    warned = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1 and "rounds away" in warned[0] and "--lora-mode unmerged" in warned[0]
    assert json.loads(proc.stdout)["params"]["lora_mode"] == "merged"
    proc = run_cli(*base)
    assert proc.returncode == 0 and "warning:" not in proc.stderr
    assert json.loads(proc.stdout)["params"]["lora_mode"] == "unmerged"


def test_info_shows_the_size_of_the_deltas(cli, tmp_path, tiny_llada):
    adapter = small_adapter(tmp_path / "a", scale=1e-2)
    facts = json.loads(cli("info", str(tiny_llada), "--adapter", str(adapter), "--json").stdout)
    delta = facts["adapter"]["delta"]
    assert delta["dtype"] == "bfloat16" and 5e-4 < delta["relative_median"] < 5e-3
    assert 0.5 < delta["lost_if_merged"] <= 1 and 0 < delta["merge_error"] <= 1
    loaded = load_model(tiny_llada, adapter=adapter).adapter.delta  # the same numbers from loaded weights
    assert loaded.relative == pytest.approx(delta["relative_median"]) and loaded.lost == delta["lost_if_merged"]
    table = cli("info", str(tiny_llada), "--adapter", str(adapter)).stdout
    assert "||dW||/||W||" in table and "round away" in table
