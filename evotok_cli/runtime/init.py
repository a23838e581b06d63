"""Create a randomly initialised LLaDA-layout checkpoint (`evotok init-model`)."""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from evotok_cli.base.errors import ConfigError
from evotok_cli.base.files import input_dir, output_dir, read_text
from evotok_cli.base.locks import LOCK_NAME, hold_dir
from evotok_cli.base.options import check_seed
from evotok_cli.runtime.architectures.llada import LLaDAConfig, LLaDAModelLM
from evotok_cli.runtime.device import host_available_bytes
from evotok_cli.runtime.tokenizer import load_tokenizer
from evotok_cli.runtime.writer import copy_tokenizer, init_weights, save_model

REAL_VOCAB, REAL_MASK_ID, REAL_EOS_ID = 126464, 126336, 126081

# A few lines in the style of the bundled tasks, so a tokenizer trained without --corpus still covers
# digits, operators, the answer format and plain English.
DEFAULT_CORPUS = [
    "<reasoning>\n3 + 4 = 7, then 7 * 2 = 14.\n</reasoning>\n<answer>\n\\boxed{14}\n</answer>",
    "Tom has 12 apples. He gives 5 apples to Ann and buys 3 more. How many apples does Tom have now?",
    "Numbers: [3, 5, 7]\nTarget: 22", "Fill the 4x4 grid so that every row, column and box holds 1, 2, 3 and 4.",
    "The quick brown fox jumps over the lazy dog. What is the answer? Solve it step by step.",
    "Respond in the following format: <reasoning> Your reasoning here </reasoning> <answer> \\boxed{...} </answer>",
]


def read_corpus(path: Path) -> list[str]:
    """Text for BPE training: every string value of every JSON line (or the raw lines)."""
    text = read_text(path, what="corpus file", fix="pass a UTF-8 .jsonl or .txt file")
    texts: list[str] = []
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except (ValueError, RecursionError):  # not JSON (or absurdly deep or long): the raw line is text
            texts.append(line)
            continue
        stack = [item]
        while stack:
            v = stack.pop()
            if isinstance(v, str):
                texts.append(v)
            elif isinstance(v, dict):
                stack.extend(v.values())
            elif isinstance(v, list):
                stack.extend(v)
    return texts


def check_out(out: Path) -> Path:
    """A new or empty folder we can write in, checked under the folder's lock before any work: nothing
    already there is overwritten."""
    out = output_dir(out, "OUT")
    if (out / "config.json").exists():
        raise ConfigError("folder already holds a checkpoint", where=str(out), fix="pick a new folder")
    if out.is_dir() and any(entry.name != LOCK_NAME for entry in out.iterdir()):
        raise ConfigError("folder is not empty", where=str(out), fix="pick a new or empty folder")
    return out


def check_sizes(*, layers: int, hidden: int, heads: int, kv_heads: int | None, mlp: int | None, max_length: int,
                vocab_size: int, shard_mb: float | None, seed: int, std: float, real_vocab: bool = False) -> None:
    """Every size flag at once, before anything is written (`--hidden 0` once left a tokenizer-only folder)."""
    sizes = {"--layers": (layers, 2), "--hidden": (hidden, 64), "--heads": (heads, 4), "--kv-heads": (kv_heads, 4),
             "--mlp": (mlp, 176), "--max-length": (max_length, 1024), "--vocab-size": (vocab_size, 512)}
    for flag, (value, example) in sizes.items():
        if value is not None and value < 1:
            raise ConfigError(f"must be a positive integer, got {value}", where=flag, fix=f"e.g. {flag} {example}")
    if shard_mb is not None and not (math.isfinite(shard_mb) and shard_mb > 0):
        raise ConfigError(f"must be a positive number of megabytes, got {shard_mb}", where="--shard-mb",
                          fix="e.g. --shard-mb 100, or leave it out for a single file")
    if not (math.isfinite(std) and std >= 0):
        raise ConfigError(f"must be a finite number >= 0, got {std}", where="--std", fix="e.g. --std 0.02")
    check_seed(seed)
    if hidden % heads:
        raise ConfigError(f"--hidden {hidden} is not divisible by --heads {heads}", where="--heads",
                          fix="pick heads dividing hidden")
    if (hidden // heads) % 2:
        raise ConfigError(f"--hidden {hidden} / --heads {heads} gives an odd head size {hidden // heads}",
                          where="--heads", fix="rotary embeddings need an even head size, e.g. --hidden 64 --heads 4")
    kv = kv_heads or heads
    if heads % kv:
        raise ConfigError(f"--heads {heads} is not divisible by --kv-heads {kv}", where="--kv-heads",
                          fix="pick kv heads dividing heads")
    _check_memory(layers=layers, hidden=hidden, mlp=mlp, vocab=max(vocab_size, REAL_VOCAB if real_vocab else 0))


def weight_bytes(*, layers: int, hidden: int, mlp: int | None, vocab: int) -> int:
    """An upper bound of the fp32 weights' bytes (full-size key/value heads; the MLP's default size)."""
    mlp = mlp or max(hidden, round(hidden * 8 / 3 / 16) * 16)
    per_layer = 4 * hidden * hidden + 3 * hidden * mlp + 2 * hidden
    return 4 * (2 * vocab * hidden + layers * per_layer + hidden)


def _check_memory(*, layers: int, hidden: int, mlp: int | None, vocab: int) -> None:
    """Refuse sizes no allocator can satisfy before anything is written: the weights are built and then
    serialized, so about twice their bytes must be free (`--hidden 1000000` asked for 4 TB per matrix)."""
    need = 2 * weight_bytes(layers=layers, hidden=hidden, mlp=mlp, vocab=vocab)
    free = host_available_bytes()
    if free is not None and need > free:
        raise ConfigError(f"these sizes need about {need / 2**30:,.1f} GiB of memory to build and save, and "
                          f"{free / 2**30:,.1f} GiB is available", where="--hidden/--layers/--mlp",
                          fix="choose smaller sizes, e.g. --layers 2 --hidden 64")


def _tokenizer_source(real_vocab: bool, tokenizer_from: Path | None, corpus: Path | None) -> Any:
    """What the tokenizer comes from, read and checked before any writing: the loaded tokenizer of
    --tokenizer-from, the corpus texts, or None for --real-vocab."""
    if real_vocab and (tokenizer_from or corpus):
        raise ConfigError("writes no tokenizer, so --tokenizer-from / --corpus would be ignored", where="--real-vocab",
                          fix="drop --tokenizer-from / --corpus, or drop --real-vocab")
    if tokenizer_from is not None:
        src = input_dir(tokenizer_from, what="tokenizer folder", error=ConfigError,
                        fix="pass a checkpoint folder that holds tokenizer.json")
        tokenizer = load_tokenizer(src)
        if tokenizer is None:
            raise ConfigError("the folder has no tokenizer.json", where=str(src),
                              fix="pass a checkpoint folder that holds tokenizer.json")
        if tokenizer.mask_token_id is None or tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no mask or EOS token", where=str(src),
                              fix="use a tokenizer with <|mdm_mask|> and <|endoftext|>")
        return tokenizer
    if real_vocab:
        return None
    return read_corpus(Path(corpus)) if corpus else DEFAULT_CORPUS


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A hidden folder to build in, moved to `out` when complete and removed on any failure (with the
    parent folders made for it), so no half-made checkpoint is ever left behind. It sits beside a new
    `out`, and inside an existing (empty) one: same file system, and the permissions already checked."""
    target = out.resolve()  # `.` or a symlink to an empty folder: the real folder
    made = [p for p in target.parents if not p.exists()]  # deepest first
    target.parent.mkdir(parents=True, exist_ok=True)
    home = target if target.is_dir() else target.parent
    stage = home / f".{target.name}.{secrets.token_hex(4)}.tmp"
    stage.mkdir()
    try:
        yield stage
        _publish(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for parent in made:
            with suppress(OSError):
                parent.rmdir()
        raise


def _publish(stage: Path, target: Path) -> None:
    """Rename the finished folder into place; into an existing (empty) folder, move its files one by one
    (taking them back out if a move fails), so the folder keeps its owner and permissions."""
    if not target.exists():
        os.rename(stage, target)
        return
    moved: list[Path] = []
    try:
        for entry in sorted(stage.iterdir()):
            os.replace(entry, target / entry.name)
            moved.append(target / entry.name)
    except BaseException:
        for path in moved:
            with suppress(OSError):
                path.unlink()
        raise
    stage.rmdir()


def create_model(out: Path, *, layers: int, hidden: int, heads: int, kv_heads: int | None, mlp: int | None,
                 max_length: int, vocab_size: int, real_vocab: bool = False, tokenizer_from: Path | None = None,
                 corpus: Path | None = None, shard_mb: float | None = None, seed: int = 0,
                 std: float = 0.02) -> Path:
    """Validate everything, then build in a staging folder: `out` appears complete or not at all."""
    check_sizes(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, mlp=mlp, max_length=max_length,
                vocab_size=vocab_size, shard_mb=shard_mb, seed=seed, std=std, real_vocab=real_vocab)
    out = output_dir(Path(out).expanduser(), "OUT")
    with hold_dir(out, "OUT"):  # one writer per folder: a second init-model into it is refused
        check_out(out)
        _build(out, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, mlp=mlp, max_length=max_length,
               vocab_size=vocab_size, real_vocab=real_vocab, tokenizer_from=tokenizer_from, corpus=corpus,
               shard_mb=shard_mb, seed=seed, std=std)
    return out


def _build(out: Path, *, layers: int, hidden: int, heads: int, kv_heads: int | None, mlp: int | None,
           max_length: int, vocab_size: int, real_vocab: bool, tokenizer_from: Path | None, corpus: Path | None,
           shard_mb: float | None, seed: int, std: float) -> None:
    source = _tokenizer_source(real_vocab, tokenizer_from, corpus)
    mlp = mlp or int(round(hidden * 8 / 3 / 16)) * 16 or hidden
    with staging(out) as stage:
        if real_vocab:
            vocab, mask_id, eos_id = REAL_VOCAB, REAL_MASK_ID, REAL_EOS_ID
        else:
            tokenizer = _write_tokenizer(source, tokenizer_from, stage, vocab_size, max_length)
            vocab, mask_id, eos_id = len(tokenizer), tokenizer.mask_token_id, tokenizer.eos_token_id
        cfg = LLaDAConfig(d_model=hidden, n_heads=heads, n_kv_heads=kv_heads or heads, n_layers=layers,
                          mlp_hidden_size=mlp, vocab_size=vocab, embedding_size=vocab, max_sequence_length=max_length,
                          rope_theta=10000.0, mask_token_id=mask_id, eos_token_id=eos_id)
        net = init_weights(LLaDAModelLM(cfg), seed=seed, std=std)
        save_model(net, cfg.to_hf(), stage, shard_bytes=int(shard_mb * 2**20) if shard_mb else None)


def _write_tokenizer(source: Any, tokenizer_from: Path | None, stage: Path, vocab_size: int,
                     max_length: int) -> Any:
    """Copy the --tokenizer-from files, or train BPE on the corpus texts, into the staging folder."""
    if tokenizer_from is not None:
        copy_tokenizer(Path(tokenizer_from).expanduser(), stage)
        return source
    from evotok_cli.runtime.tokenizer_build import build_tokenizer
    return build_tokenizer(source, stage, vocab_size=vocab_size, model_max_length=max_length)
