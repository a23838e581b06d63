"""Fixtures: tiny checkpoints written in the exact Hugging Face layout of LLaDA-8B (full config key set,
official tensor names, single-file and sharded), with a small BPE tokenizer that carries LLaDA's
special tokens and a Llama-3 chat template."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest_plugins = ["tests.source_tree_guard", "tests.quick"]  # writes into the checkout fail; -m quick

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # commands run in process keep one thread (evotok_cli/base/threads.py)
torch.set_num_threads(1)

from evotok_cli.runtime.architectures.llada import LLaDAConfig, LLaDAModelLM  # noqa: E402
from evotok_cli.runtime.tokenizer_build import build_tokenizer  # noqa: E402
from evotok_cli.runtime.writer import init_weights, save_model  # noqa: E402

CORPUS = [
    "What is 2 + 3? Tom has 12 apples and buys 5 more. How many apples does he have?",
    "<reasoning>\n12+5=17.\n</reasoning>\n<answer>\n\\boxed{17}\n</answer>",
    "Solve the 4x4 sudoku: 12.4|3...|..12|4..3. Numbers: [3, 5, 7] Target: 22",
    "The quick brown fox jumps over the lazy dog. Hello world, how are you today?",
] * 4


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(CORPUS, folder, vocab_size=300)
    return folder


def write_llada(folder: Path, tokenizer_dir: Path | None, *, layers: int = 2, hidden: int = 64, heads: int = 4,
                kv_heads: int = 4, mlp: int = 96, vocab: int | None = None, max_length: int = 256, seed: int = 0,
                std: float = 0.3, shard_bytes: int | None = None, mask_id: int | None = None,
                eos_id: int | None = None) -> Path:
    """A random LLaDA checkpoint; std 0.3 makes predictions peaked enough to avoid near-ties."""
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, folder / f.name)
        tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
        vocab = vocab or len(tok)
        mask_id = tok.mask_token_id if mask_id is None else mask_id
        eos_id = tok.eos_token_id if eos_id is None else eos_id
    cfg = LLaDAConfig(d_model=hidden, n_heads=heads, n_kv_heads=kv_heads, n_layers=layers, mlp_hidden_size=mlp,
                      vocab_size=vocab, embedding_size=vocab, max_sequence_length=max_length, rope_theta=500000.0,
                      mask_token_id=mask_id, eos_token_id=eos_id)
    net = init_weights(LLaDAModelLM(cfg), seed=seed, std=std)
    save_model(net, cfg.to_hf(), folder, shard_bytes=shard_bytes)
    return folder


@pytest.fixture(scope="session")
def tiny_llada(tmp_path_factory, tokenizer_dir) -> Path:
    return write_llada(tmp_path_factory.mktemp("tiny") / "llada", tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llada_sharded(tmp_path_factory, tokenizer_dir) -> Path:
    return write_llada(tmp_path_factory.mktemp("tiny") / "llada-sharded", tokenizer_dir, shard_bytes=40_000)


@pytest.fixture(scope="session")
def tiny_model(tiny_llada):
    from evotok_cli.runtime.model import load_model
    return load_model(tiny_llada)


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `evotok ...` in a fresh process, as a user would."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if not k.startswith("EVOTOK_") or (env and k in env)}
    return subprocess.run([sys.executable, "-m", "evotok_cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=600)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """Assert the user-error contract: exit 2, no traceback, one line on stderr starting with 'error:'."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.returncode, self.stdout, self.stderr = code, out, err


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `evotok ...` in this process (fast); same entry point and error handling as the console script."""
    from evotok_cli.cli.app import main

    def run(*args: str, env: dict[str, str] | None = None) -> CliResult:
        for key in [k for k in os.environ if k.startswith("EVOTOK_")]:
            monkeypatch.delenv(key)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(sys, "argv", ["evotok", *args])
        capsys.readouterr()
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


# -- Dream (Qwen2 layout, ChatML) ----------------------------------------------------------------------

@pytest.fixture(scope="session")
def dream_tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dream-tokenizer")
    build_tokenizer(CORPUS, folder, vocab_size=300, chatml=True)
    return folder


def write_dream(folder: Path, tokenizer_dir: Path | None = None, *, layers: int = 2, hidden: int = 64,
                heads: int = 4, kv_heads: int = 2, mlp: int = 96, vocab: int | None = None, max_length: int = 256,
                seed: int = 0, std: float = 0.3, bias_std: float = 0.3, tie: bool = False,
                shard_bytes: int | None = None) -> Path:
    """A random Dream checkpoint: real config key set, Qwen2 tensor names, grouped-query attention and
    non-zero q/k/v biases, with a ChatML tokenizer (built here when `tokenizer_dir` is None)."""
    from transformers import PreTrainedTokenizerFast

    from evotok_cli.runtime.architectures.dream import DreamConfig, DreamModel

    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        build_tokenizer(CORPUS, folder, vocab_size=300, chatml=True)
    else:
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, folder / f.name)
    tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
    cfg = DreamConfig(d_model=hidden, n_heads=heads, n_kv_heads=kv_heads, n_layers=layers, intermediate_size=mlp,
                      vocab_size=vocab or len(tok), max_position_embeddings=max_length, rope_theta=1e6,
                      tie_word_embeddings=tie, mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.eos_token_id)
    net = init_weights(DreamModel(cfg), seed=seed, std=std)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * bias_std)
    save_model(net, cfg.to_hf(), folder, shard_bytes=shard_bytes)
    return folder


@pytest.fixture(scope="session")
def tiny_dream(tmp_path_factory, dream_tokenizer_dir) -> Path:
    return write_dream(tmp_path_factory.mktemp("tiny") / "dream", dream_tokenizer_dir)
