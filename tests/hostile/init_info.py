"""Hostile `evotok init-model` arguments (every one refused before anything is written) and hostile
`evotok info` inputs (missing or broken model folders and adapters)."""

from __future__ import annotations

import shutil

import torch

from tests.hostile import BAD_BYTES, Case, Ctx, both, write
from tests.hostile.model import adapter, copy, edit_config, edit_weights, lora, put, symlink_loop

OUT = "{tmp}/out"


def init(*extra: str, out: str = OUT) -> list[str]:
    return ["init-model", out, "--layers", "1", "--hidden", "32", "--heads", "2", *extra]


def tokenizer_only(ctx: Ctx) -> None:
    """A folder holding the tiny model's tokenizer files but no checkpoint."""
    (ctx.tmp / "tok").mkdir()
    for path in ctx.model.glob("tokenizer*.json"):
        shutil.copy(path, ctx.tmp / "tok" / path.name)


def info(model: str = "{tmp}/m", *extra: str) -> list[str]:
    return ["info", model, *extra]


SIZE_CASES = [  # (id, flags, expected)
    ("hidden-zero", ["--hidden", "0"], "--hidden: must be a positive integer, got 0"),
    ("layers-zero", ["--layers", "0"], "--layers: must be a positive integer, got 0"),
    ("layers-negative", ["--layers", "-1"], "--layers: must be a positive integer, got -1"),
    ("heads-zero", ["--heads", "0"], "--heads: must be a positive integer, got 0"),
    ("kv-heads-zero", ["--kv-heads", "0"], "--kv-heads: must be a positive integer, got 0"),
    ("kv-heads-not-dividing", ["--heads", "4", "--kv-heads", "3"], "--heads 4 is not divisible by --kv-heads 3"),
    ("mlp-zero", ["--mlp", "0"], "--mlp: must be a positive integer, got 0"),
    ("max-length-zero", ["--max-length", "0"], "--max-length: must be a positive integer"),
    ("vocab-size-negative", ["--vocab-size", "-5"], "--vocab-size: must be a positive integer, got -5"),
    ("shard-mb-zero", ["--shard-mb", "0"], "--shard-mb: must be a positive number of megabytes"),
    ("shard-mb-nan", ["--shard-mb", "nan"], "--shard-mb: must be a positive number of megabytes, got nan"),
    ("std-nan", ["--std", "nan"], "--std: must be a finite number >= 0, got nan"),
    ("std-negative", ["--std", "-0.1"], "--std: must be a finite number >= 0"),
    ("hidden-not-divisible", ["--hidden", "33"], "--hidden 33 is not divisible by --heads 2"),
    ("head-size-odd", ["--hidden", "6", "--heads", "2"], "odd head size 3"),
    ("seed-huge", ["--seed", str(2**70)], "seed must be in [0, 9223372036854775807]"),
    # sizes no allocator can satisfy: refused from the shapes before a tensor is made (was a 4 TB alloc traceback)
    ("hidden-unallocatable", ["--hidden", "1000000"], "GiB of memory to build and save"),
    ("layers-unallocatable", ["--layers", "100000", "--hidden", "4096", "--heads", "32"], "GiB of memory"),
    ("mlp-unallocatable", ["--mlp", str(10**12)], "GiB of memory"),
    ("real-vocab-wide", ["--real-vocab", "--hidden", "400000", "--heads", "4"], "GiB of memory"),
]

CASES = [
    *[Case(f"init-{name}", init(*flags), expect) for name, flags, expect in SIZE_CASES],
    # where it writes: checked before any work, and nothing already there is touched
    Case("init-out-in-proc", init(out="/proc/evotok-x"), "cannot write into /proc"),
    Case("init-out-is-a-file", init(), "is a file, not a folder", write("out", "keep me")),
    Case("init-out-parent-is-a-file", init(out="{tmp}/f/out"), "is a file, so", write("f", "keep me")),
    Case("init-out-symlink-loop", init(), "output folder is a symbolic link loop", symlink_loop("out")),
    Case("init-out-holds-a-checkpoint", init(out="{tmp}/m"), "folder already holds a checkpoint", copy()),
    Case("init-out-not-empty", init(), "folder is not empty", write("out/notes.txt", "mine")),
    # what the tokenizer comes from
    Case("init-corpus-not-utf8", init("--corpus", "{tmp}/c.txt"), "corpus file is not UTF-8",
         write("c.txt", BAD_BYTES)),
    Case("init-corpus-missing", init("--corpus", "{tmp}/c.txt"), "corpus file does not exist"),
    Case("init-corpus-is-a-folder", init("--corpus", "{tmp}"), "corpus file is a folder, not a file"),
    Case("init-tokenizer-from-missing", init("--tokenizer-from", "{tmp}/nope"), "tokenizer folder does not exist"),
    Case("init-tokenizer-from-empty", init("--tokenizer-from", "{tmp}/tok"), "the folder has no tokenizer.json",
         write("tok/readme.txt", "no tokenizer here")),
    Case("init-tokenizer-from-broken", init("--tokenizer-from", "{tmp}/tok"), "tokenizer_config.json: not valid JSON",
         both(tokenizer_only, write("tok/tokenizer_config.json", "{"))),
    Case("init-real-vocab-with-corpus", init("--real-vocab", "--corpus", "{tmp}/c.txt"), "writes no tokenizer",
         write("c.txt", "hello")),
    # info: the model folder
    Case("info-missing", info("{tmp}/nope"), "model folder does not exist"),
    Case("info-is-a-file", info("{tmp}/f"), "model folder is a file, not a folder", write("f", "x")),
    Case("info-symlink-loop", info(), "model folder is a symbolic link loop", symlink_loop("m")),
    Case("info-config-not-json", info(), "config.json: not valid JSON", both(copy(), write("m/config.json", "{"))),
    Case("info-config-not-utf8", info(), "config.json is not UTF-8", both(copy(), write("m/config.json", BAD_BYTES))),
    Case("info-config-heads-string", info("{tmp}/m", "--json"), "key n_heads must be a positive integer",
         edit_config(n_heads="four")),
    Case("info-config-layers-negative", info(), "key n_layers must be a positive integer, got -1",
         edit_config(n_layers=-1)),
    Case("info-dream-config-hidden-list", info(), "key hidden_size must be a positive integer, got [64]",
         edit_config("dream", hidden_size=[64])),
    Case("info-weights-int8", info(), "has dtype I8",
         edit_weights(put("model.transformer.ln_f.weight", lambda t: t.to(torch.int8)))),
    Case("info-tokenizer-config-not-utf8", info(), "tokenizer_config.json is not UTF-8",
         both(copy(), write("m/tokenizer_config.json", BAD_BYTES))),
    # info: the adapter
    Case("info-adapter-missing", info("{model}", "--adapter", "{tmp}/a"), "adapter folder does not exist"),
    Case("info-adapter-config-not-json", info("{model}", "--adapter", "{tmp}/a"), "adapter_config.json: not valid",
         both(adapter(), write("a/adapter_config.json", "nope"))),
    Case("info-adapter-config-missing", info("{model}", "--adapter", "{tmp}/a", "--json"), "no adapter_config.json",
         write("a/adapter_model.safetensors", b"")),
    Case("info-adapter-r-contradicts", info("{model}", "--adapter", "{tmp}/a"), "says r=16", adapter(r=16)),
    Case("info-adapter-int8", info("{model}", "--adapter", "{tmp}/a"), "has dtype I8",
         adapter(lora("model.transformer.blocks.1.q_proj", 4, torch.int8))),
    Case("info-adapter-weights-truncated", info("{model}", "--adapter", "{tmp}/a"), "unreadable safetensors",
         both(adapter(), write("a/adapter_model.safetensors", b"\x08\x00\x00"))),
]
