"""`evotok finetune` made ready for GPUs, checked without one: each process's device is set from
LOCAL_RANK before the process group starts (CUDA faked), --full is refused when its training state cannot
fit, FSDP gets a bf16/fp32 mixed-precision policy on CUDA, activation checkpointing changes no gradient,
FSDP checkpoints are written shard by shard and resume bit-identically, and a large --full export is
written in shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from evotok_cli.base.errors import ConfigError
from evotok_cli.runtime import distributed
from evotok_cli.runtime.model import load_model
from evotok_cli.training import memory
from evotok_cli.training.trainer import TrainConfig, Trainer
from tests.conftest import one_line_error


class FakeCuda:
    """torch.cuda with `count` GPUs of `free` bytes, and a process group that only records its start."""

    def __init__(self, monkeypatch, *, count: int = 2, free: int = 80 * 10**9):
        self.calls: list[tuple] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: self.calls.append(("set_device", str(d))))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (free, free))
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
        monkeypatch.setattr(torch.distributed, "init_process_group",
                            lambda backend, **kw: self.calls.append(("init", backend, kw["timeout"])))


def _launched(monkeypatch, rank: int, world: int = 2) -> None:
    for key, value in (("WORLD_SIZE", world), ("RANK", rank), ("LOCAL_RANK", rank)):
        monkeypatch.setenv(key, str(value))


# -- one GPU per process --------------------------------------------------------------------------------
@pytest.mark.parametrize("requested", ["auto", "cuda"])
def test_each_process_takes_gpu_local_rank_before_the_group_starts(monkeypatch, requested):
    fake = FakeCuda(monkeypatch)
    _launched(monkeypatch, rank=1)
    group = distributed.from_environment(device=requested, timeout=distributed.timeout_from(None))
    assert fake.calls == [("set_device", "cuda:1"), ("init", "nccl", timedelta(minutes=30))]
    assert group.device(requested) == "cuda:1" and group.backend == "nccl" and group.rank == 1


def test_an_explicit_gpu_under_a_launcher_is_refused(monkeypatch):
    fake = FakeCuda(monkeypatch)
    _launched(monkeypatch, rank=0)
    with pytest.raises(ConfigError, match="cuda:0 would put all 2 processes on the same GPU") as exc:
        distributed.from_environment(device="cuda:0")
    assert "--device cuda" in exc.value.line() and fake.calls == []  # refused before anything started


def test_a_cpu_process_keeps_gloo_and_touches_no_gpu(monkeypatch):
    fake = FakeCuda(monkeypatch)
    _launched(monkeypatch, rank=1)
    distributed.from_environment(device="cpu", timeout=distributed.timeout_from(5))
    assert fake.calls == [("init", "gloo", timedelta(minutes=5))]


def test_one_process_starts_no_group_and_keeps_its_gpu(monkeypatch):
    fake = FakeCuda(monkeypatch)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.from_environment(device="cuda:1").world == 1
    assert fake.calls == [("set_device", "cuda:1")]  # made current, so its random state is what is saved
    assert distributed.from_environment(device="auto").world == 1 and len(fake.calls) == 1
    assert distributed.rank_device("cuda:1", 0, 1) == "cuda:1"


# -- --full against the GPU's memory --------------------------------------------------------------------
def test_full_memory_numbers_at_8b():
    params = 8_020_000_000
    with pytest.raises(ConfigError) as exc:
        memory.check_full(params, 79 * 10**9, shards=1, device="cuda:0")
    line = exc.value.line()
    assert line.startswith("--full: training all 8.02B weights needs 128.3 GB per GPU"), line
    assert "79.0 GB free" in line and "--nproc_per_node 2 ... --fsdp" in line and "LoRA" in line
    memory.check_full(params, 79 * 10**9, shards=2, device="cuda:0")  # 64 GB a GPU: fits
    assert memory.full_need(params, 8) == 4 * params  # 16 GB of shards, but the 32 GB load comes first


def test_full_is_refused_on_a_small_gpu_before_the_model_loads(cli, tmp_path, tiny_llada, monkeypatch):
    FakeCuda(monkeypatch, free=1000)
    monkeypatch.setattr("evotok_cli.runtime.model.load_model", _must_not_load)
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    line = one_line_error(cli("finetune", str(data), "-m", str(tiny_llada), "--out", str(tmp_path / "o"), "--full"))
    assert line.startswith("error: --full: training all") and "needs" in line and "cuda:0 has 0.0 MB free" in line
    assert "drop --full to train a LoRA adapter (the fp32 model alone does not fit this GPU)" in line
    assert not (tmp_path / "o").exists()


def test_the_trainer_binds_the_rank_gpu_then_checks_memory(tmp_path, tiny_llada, monkeypatch):
    fake = FakeCuda(monkeypatch)
    calls = []
    monkeypatch.setattr(memory, "gpu_memory", lambda device: calls.append(str(device)) or (1000, 1000))
    _launched(monkeypatch, rank=1)
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    trainer = Trainer(TrainConfig(data=str(data), model=str(tiny_llada), out=str(tmp_path / "o"), full=True,
                                  fsdp=True), log=lambda m: None)
    with pytest.raises(ConfigError, match="sharded over 2 processes"):
        trainer.setup()
    assert fake.calls[:2] == [("set_device", "cuda:1"), ("init", "nccl", timedelta(minutes=30))]
    assert calls == ["cuda:1"]


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the memory check")


# -- activation checkpointing ---------------------------------------------------------------------------
def test_checkpointing_default_rule():
    size = memory.ModelSize(params=8 * 10**9, layers=32, hidden=4096)
    gb80 = 80 * 10**9
    assert not memory.checkpointing_default(cuda=False, full=True, size=size, tokens=10**6, total=gb80)
    assert memory.checkpointing_default(cuda=True, full=True, size=size, tokens=16, total=gb80)
    assert not memory.checkpointing_default(cuda=True, full=False, size=size, tokens=2 * 1024, total=gb80)
    assert memory.checkpointing_default(cuda=True, full=False, size=size, tokens=4 * 2048, total=gb80)
    assert memory.checkpointing_default(cuda=True, full=False, size=size, tokens=2 * 1024, total=24 * 10**9)


def _grads(lm, ids, labels, checkpointed: bool) -> tuple[float, dict[str, torch.Tensor], int]:
    net = lm.net
    net.activation_checkpointing = checkpointed
    net.train().requires_grad_(True)
    net.zero_grad(set_to_none=True)
    calls = []
    blocks = net.shard_units()
    hooks = [b.register_forward_pre_hook(lambda *a: calls.append(1)) for b in blocks]
    loss = F.cross_entropy(net(ids).flatten(0, 1).float(), labels.flatten())
    loss.backward()
    for h in hooks:
        h.remove()
    return float(loss.detach()), {n: p.grad.clone() for n, p in net.named_parameters()}, len(calls) // len(blocks)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(family, tiny_llada, tiny_dream):
    lm = load_model(tiny_llada if family == "llada" else tiny_dream, load_tokenizer=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, lm.vocab_size, (2, 16), generator=g)
    labels = torch.randint(5, lm.vocab_size, (2, 16), generator=g)
    loss_a, grads_a, runs_a = _grads(lm, ids, labels, checkpointed=False)
    loss_b, grads_b, runs_b = _grads(lm, ids, labels, checkpointed=True)
    assert (runs_a, runs_b) == (1, 2)  # checkpointed: each block's forward runs again in the backward
    assert loss_a == loss_b
    for name, grad in grads_a.items():
        assert torch.equal(grad, grads_b[name]), name  # the same computation, repeated: exactly equal
    lm.net.eval()
    with torch.no_grad():  # never at inference, even with the flag left on
        lm.net(ids)


def test_finetune_flag_reaches_the_model(tmp_path, tiny_llada):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    for flag in (True, False, None):
        trainer = Trainer(TrainConfig(data=str(data), model=str(tiny_llada), out=str(tmp_path / str(flag)),
                                      objective="sft", activation_checkpointing=flag, lora_r=2),
                          log=lambda m: None)
        trainer.setup()
        assert trainer.transformer.activation_checkpointing is bool(flag)  # None on the CPU: off


# -- FSDP on CUDA ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_fsdp_mixed_precision_only_on_cuda(monkeypatch, tiny_llada, tmp_path, device):
    import torch.distributed.fsdp as fsdp

    seen = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: seen.append(kw.get("mp_policy")))
    trainer = Trainer(TrainConfig(data="d", model=str(tiny_llada), out=str(tmp_path)), log=lambda m: None)
    trainer.transformer = load_model(tiny_llada, load_tokenizer=False).net
    trainer.device = torch.device(device, 0) if device == "cuda" else torch.device("cpu")
    trainer._shard()
    assert len(seen) == len(trainer.transformer.shard_units()) + 1
    if device == "cpu":
        assert seen == [None] * len(seen)
    else:
        assert {(p.param_dtype, p.reduce_dtype) for p in seen} == {(torch.bfloat16, torch.float32)}


# -- a large --full export -----------------------------------------------------------------------------
def test_full_export_is_sharded_and_bf16_when_large(tmp_path, tiny_llada, monkeypatch):
    from evotok_cli.training import export as export_module

    monkeypatch.setattr(export_module, "EXPORT_SHARD_BYTES", 200_000)
    monkeypatch.setattr(Trainer, "_export_dtype", lambda self: torch.bfloat16)  # what a GPU run writes
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "What is 1+1?", "response": "2"}\n' * 4)
    out = tmp_path / "full"
    trainer = Trainer(TrainConfig(data=str(data), model=str(tiny_llada), out=str(out), objective="sft", full=True,
                                  max_steps=1, batch_size=2, grad_accum=1), log=lambda m: None)
    trainer.setup()
    trainer.train()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert not (out / "model.safetensors").exists()
    reloaded = load_model(out, dtype="float32", load_tokenizer=False)
    trained = trainer.transformer.state_dict()
    for name, tensor in reloaded.net.state_dict().items():
        assert torch.equal(tensor, trained[name].to(torch.bfloat16).float()), name


# -- FSDP checkpoints, shard by shard (two gloo processes) ----------------------------------------------
WORKER = Path(__file__).with_name("fsdp_worker.py")


def _torchrun(args: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), json.dumps(args)], capture_output=True, text=True, env=env, timeout=600,
                          cwd=tmp_path)


@pytest.mark.slow
def test_fsdp_checkpoints_are_sharded_and_resume_bit_identically(tmp_path, tiny_llada):
    from safetensors.torch import load_file

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a}+{b}?", "response": f"{a}+{b}={a + b}."}) + "\n"
                            for a in range(1, 7) for b in range(1, 5)))
    common = dict(data=str(data), model=str(tiny_llada), objective="cts", fsdp=True, lora_r=4, lora_alpha=8,
                  lora_dropout=0.1, lr=5e-3, batch_size=2, grad_accum=2, max_steps=4, save_every=2, seed=1,
                  warmup=1, block_sizes=[8], min_response=1)
    whole = _torchrun({**common, "out": str(tmp_path / "whole")}, tmp_path)
    assert whole.returncode == 0, whole.stderr
    cut = _torchrun({**common, "out": str(tmp_path / "cut"), "stop_at": 1}, tmp_path)
    assert cut.returncode != 0 and "exitcode  : 143" in cut.stderr, cut.stderr  # torchrun: 1 when one failed
    ckpt = tmp_path / "cut" / "checkpoints" / "checkpoint-0000001"
    files = sorted(p.name for p in ckpt.iterdir())
    assert files == ["model-rank00000-of-00002.safetensors", "model-rank00001-of-00002.safetensors",
                     "optimizer-rank00000-of-00002.safetensors", "optimizer-rank00001-of-00002.safetensors",
                     "rng.safetensors", "state.json"]
    assert json.loads((ckpt / "state.json").read_text())["shards"] == 2
    halves = [load_file(str(ckpt / f"model-rank0000{r}-of-00002.safetensors")) for r in (0, 1)]
    adapter = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    name = next(n for n in halves[0] if "lora_A" in n)
    full_rows = next(t for n, t in adapter.items() if n.split("lora_A")[0] in name and "lora_A" in n).shape[0]
    assert halves[0][name].shape[0] + halves[1][name].shape[0] == full_rows  # each process: its rows only
    again = _torchrun({**common, "out": str(tmp_path / "cut"), "resume": True}, tmp_path)
    assert again.returncode == 0, again.stderr
    resumed = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    assert adapter.keys() == resumed.keys()
    for key in adapter:
        assert torch.equal(adapter[key], resumed[key]), key
    logs = [[json.loads(x)["loss"] for x in (tmp_path / run / "loss_log.jsonl").read_text().splitlines()]
            for run in ("whole", "cut")]
    assert logs[0] == logs[1] and len(logs[0]) == 4
