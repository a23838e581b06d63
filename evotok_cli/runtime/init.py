"""Create a randomly initialised LLaDA-layout checkpoint (`evotok init-model`)."""

from __future__ import annotations

import json
from pathlib import Path

from evotok_cli.errors import ConfigError, DataError
from evotok_cli.runtime.architectures.llada import LLaDAConfig, LLaDAModelLM
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
    if not path.is_file():
        raise DataError("corpus file not found", where=str(path), fix="pass a .jsonl or .txt file")
    texts: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
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


def create_model(out: Path, *, layers: int, hidden: int, heads: int, kv_heads: int | None, mlp: int | None,
                 max_length: int, vocab_size: int, real_vocab: bool = False, tokenizer_from: Path | None = None,
                 corpus: Path | None = None, shard_mb: float | None = None, seed: int = 0,
                 std: float = 0.02) -> Path:
    out = Path(out).expanduser()
    if (out / "config.json").exists():
        raise ConfigError("folder already holds a checkpoint", where=str(out), fix="pick a new folder")
    if hidden % heads:
        raise ConfigError(f"--hidden {hidden} is not divisible by --heads {heads}", where="--heads",
                          fix="pick heads dividing hidden")
    kv = kv_heads or heads
    if heads % kv:
        raise ConfigError(f"--heads {heads} is not divisible by --kv-heads {kv}", where="--kv-heads",
                          fix="pick kv heads dividing heads")
    mlp = mlp or int(round(hidden * 8 / 3 / 16)) * 16 or hidden
    if real_vocab:
        vocab, mask_id, eos_id = REAL_VOCAB, REAL_MASK_ID, REAL_EOS_ID
    else:
        from transformers import PreTrainedTokenizerFast

        out.mkdir(parents=True, exist_ok=True)
        if tokenizer_from is not None:
            copy_tokenizer(Path(tokenizer_from), out)
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(out))
        else:
            from evotok_cli.training.tokenizer_build import build_tokenizer
            texts = read_corpus(Path(corpus)) if corpus else DEFAULT_CORPUS
            tokenizer = build_tokenizer(texts, out, vocab_size=vocab_size, model_max_length=max_length)
        vocab = len(tokenizer)
        mask_id = tokenizer.mask_token_id
        eos_id = tokenizer.eos_token_id
        if mask_id is None or eos_id is None:
            raise ConfigError("the tokenizer has no mask or EOS token", where=str(tokenizer_from or out),
                              fix="use a tokenizer with <|mdm_mask|> and <|endoftext|>")
    cfg = LLaDAConfig(d_model=hidden, n_heads=heads, n_kv_heads=kv, n_layers=layers, mlp_hidden_size=mlp,
                      vocab_size=vocab, embedding_size=vocab, max_sequence_length=max_length,
                      rope_theta=10000.0, mask_token_id=mask_id, eos_token_id=eos_id)
    net = init_weights(LLaDAModelLM(cfg), seed=seed, std=std)
    save_model(net, cfg.to_hf(), out, shard_bytes=int(shard_mb * 2**20) if shard_mb else None)
    return out
