"""Untrusted model folders: a shard index that names files outside the folder, an adapter that carries
tensors its config does not declare, a chat template that loops, raises or does not parse, and prompt ids
that hold the mask token. (Control tokens a user types are not an error: tests/test_untrusted_inputs.py.)"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
from safetensors import safe_open

from tests.hostile import Case, Ctx, both, write
from tests.hostile.model import GEN, Q0, adapter, copy, generate, lora, with_adapter

MASK_ID = 2  # the tiny LLaDA's <|mdm_mask|>
BENCH = ["bench", "sudoku4", "-m", "{tmp}/m", "--limit", "1", *GEN, "--out", "{tmp}/out"]


def index_naming(shard: Callable[[Ctx], str]) -> Callable[[Ctx], None]:
    """A copy at `{tmp}/m` whose weights moved to `{tmp}/x.safetensors` (beside the folder, readable) and
    whose index names them by `shard(ctx)`: loading must not follow it out of the folder."""
    def setup(ctx: Ctx) -> None:
        copy()(ctx)
        folder, outside = ctx.tmp / "m", ctx.tmp / "x.safetensors"
        (folder / "model.safetensors").rename(outside)
        with safe_open(str(outside), framework="pt") as f:
            names = list(f.keys())  # noqa: SIM118 - safe_open is not iterable
        name = shard(ctx)
        index = {"metadata": {}, "weight_map": {n: name for n in names}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return setup


def via_linked_folder(ctx: Ctx) -> str:
    """`sub/x.safetensors`, where `sub` is a link to the folder's parent."""
    os.symlink(ctx.tmp, ctx.tmp / "m" / "sub")
    return "sub/x.safetensors"


def template(text: str) -> Callable[[Ctx], None]:
    return both(copy(), write("m/chat_template.jinja", text))


def full(name: str, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    return {f"base_model.model.{name}": torch.zeros(shape)}


WTE = "model.transformer.wte.weight"
LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
RECURSE = "{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}"

CASES = [
    # the shard index names files outside the folder
    Case("untrusted-index-parent", generate(), "weight_map names '../x.safetensors', a path",
         index_naming(lambda ctx: "../x.safetensors")),
    Case("untrusted-index-parent-twice", generate(), "weight_map names '../../x.safetensors', a path",
         index_naming(lambda ctx: "../../x.safetensors")),
    Case("untrusted-index-absolute", generate(), "a path, not a file in the model folder",
         index_naming(lambda ctx: str(ctx.tmp / "x.safetensors"))),
    Case("untrusted-index-linked-subfolder", generate(), "weight_map names 'sub/x.safetensors', a path",
         index_naming(via_linked_folder)),
    Case("untrusted-index-backslash", generate(), "a path, not a file in the model folder",
         index_naming(lambda ctx: "..\\x.safetensors")),
    Case("untrusted-index-not-a-name", generate(), "weight_map names a shard 7, not a file name",
         index_naming(lambda ctx: 7)),  # type: ignore[arg-type, return-value]
    Case("untrusted-index-info", ["info", "{tmp}/m"], "weight_map names '../x.safetensors', a path",
         index_naming(lambda ctx: "../x.safetensors")),
    Case("untrusted-index-bench", BENCH, "weight_map names '/", index_naming(lambda ctx: str(ctx.tmp / "x.safetensors"))),
    # adapters that carry what adapter_config.json does not declare
    Case("untrusted-adapter-undeclared-embedding", with_adapter(),
         f"adapter tensor base_model.model.{WTE} is not declared in adapter_config.json",
         adapter({**lora(Q0, 4), **full(WTE, (300, 64))})),
    Case("untrusted-adapter-undeclared-lora", with_adapter(),
         "model.transformer.blocks.0.v_proj.lora_A.weight (+1 more) is not declared",
         adapter({**lora(Q0, 4), **lora("model.transformer.blocks.0.v_proj", 4)})),
    Case("untrusted-adapter-other-module-to-save", with_adapter(), "ff_out.weight is not declared",
         adapter({**lora(Q0, 4), **full("model.transformer.ff_out.weight", (300, 64))}, modules_to_save=["wte"])),
    Case("untrusted-adapter-modules-to-save-string", with_adapter(), "modules_to_save must be a list of module names",
         adapter(modules_to_save="wte")),
    Case("untrusted-adapter-undeclared-bench", ["bench", "sudoku4", "-m", "{model}", "--adapter", "{tmp}/a",
                                                "--limit", "1", *GEN, "--out", "{tmp}/out"],
         "is not declared in adapter_config.json", adapter({**lora(Q0, 4), **full(WTE, (300, 64))})),
    # chat templates that loop, raise, or do not parse: one line, never a hang
    Case("untrusted-template-loops", generate(), "the chat template ran longer than", template(LOOP)),
    Case("untrusted-template-raises", generate(), "the chat template refuses these messages (no system turns)",
         template("{{ raise_exception('no system turns') }}")),
    Case("untrusted-template-syntax", generate(), "the chat template is not valid Jinja", template("{% for %}")),
    Case("untrusted-template-recursion", generate(), "the chat template fails (RecursionError", template(RECURSE)),
    Case("untrusted-template-escape", generate(), "an operation the sandbox forbids",
         template("{{ messages.__class__.__mro__[1].__subclasses__() }}")),
    Case("untrusted-template-undefined", generate(), "the chat template uses an undefined value",
         template("{{ nothing.here }}")),
    Case("untrusted-template-bench-raises", BENCH, "chat_template.jinja: the chat template refuses",
         template("{{ raise_exception('bench') }}")),
    # prompt ids that hold the mask token (the decoder would overwrite it as if generated)
    Case("untrusted-prompt-ids-mask", ["generate", "-m", "{model}", "--prompt-ids", f"5,{MASK_ID},6", *GEN],
         f"--prompt-ids: token id {MASK_ID} is the mask token"),
    Case("untrusted-prompt-ids-only-mask", ["generate", "-m", "{model}", "--prompt-ids", str(MASK_ID), *GEN],
         "is the mask token"),
    Case("untrusted-prompts-file-ids-mask", ["generate", "-m", "{model}", "--prompts-file", "{tmp}/p.jsonl", *GEN],
         f"p.jsonl:2: token id {MASK_ID} is the mask token",
         write("p.jsonl", '"hi"\n{"prompt_ids": [5, 2]}\n')),
    Case("untrusted-prompts-file-ids-outside", ["generate", "-m", "{model}", "--prompts-file", "{tmp}/p.jsonl", *GEN],
         "p.jsonl:1: token id 99999 is outside the vocabulary", write("p.jsonl", '{"prompt_ids": [5, 99999]}\n')),
    Case("untrusted-prefill-mask", ["generate", "-m", "{model}", "-p", "hi", "--prefill", "<|mdm_mask|>", *GEN],
         "--prefill: the prompt encodes to the mask token id"),
]
