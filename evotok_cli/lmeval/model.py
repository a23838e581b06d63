"""The `evotok` model of lm-evaluation-harness: any evotok decoder behind lm-eval's model interface.

Importing this module registers the class with lm-eval as `evotok`; `python -m evotok_cli.lmeval` does
that before running lm-eval's command line (docs/lm-eval.md).

- model_args: the generation settings (`gen_length`, `block_length`, `steps`, `temperature`), `model`
  (alias `pretrained`; default: the bundled model), `adapter`, `decoder`, `seed`, `batch_size`,
  `device`, `dtype`, `lora_mode`, `padded_attention`, `quantize`, `threads` (as `evotok generate`'s), `mc_num`,
  `mc_batch_size`, `stop_at_eos`; every other key is an option of the
  decoder, checked by `make_decoder` before the model loads. model_args win over the harness's
  `--batch_size` / `--device`, which its command line always sends (defaults included); a harness
  device naming CUDA on a machine without it falls back to `auto`, as lm-eval's `hf` model does.
- `generate_until`: the context (already chat-templated by lm-eval under `--apply_chat_template`,
  through `apply_chat_template` below) is encoded by the tokenizer's default call, as `evotok bench`
  encodes its prompts, and decoded by `evotok_cli.jobs.generation.generate` (the step engine). A request's
  `max_gen_toks` becomes the gen length, rounded up to whole blocks (of `block_length`, or of the decoder's
  fixed block, d2f's `block_size`), with the steps per block of model_args kept (gen_length=256, steps=128
  and max_gen_toks=100 decode 128 tokens in 64 steps: below gen_length, `evotok serve`'s canvas for a
  max_tokens cap); without it the model_args' gen_length applies. The answer is cut to max_gen_toks tokens,
  as `serve` cuts to max_tokens, then at the first `until` string.
  `stop_at_eos=true` (default) first cuts it at the first EOS / end-of-turn token, special tokens
  dropped (what `evotok generate` prints, and what lm-eval's `hf` model returns); `stop_at_eos=false`
  keeps the whole generated span with special tokens, the text `evotok bench` scores. The task's
  `temperature` / `do_sample` are ignored: the decoder samples at model_args' `temperature`.
- Seeds: request i samples from `seed + doc_id` (its r-th repeat from `seed + doc_id + r * 2**20`), as
  `evotok bench` seeds item doc_id, so batch size and order do not change the noise.
- `loglikelihood`: LLaDA's Monte Carlo bound (`evotok_cli.lmeval.loglik`), context and continuation split
  as lm-eval's own models split them; `loglikelihood_rolling` is not provided.
- One process: rank 0 of 1 (several GPUs: `evotok bench` shards; lm-eval's data parallelism is not wired).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import defaultdict
from typing import Any

from evotok_cli.base import stopping
from evotok_cli.base.errors import CheckpointError, ConfigError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - exercised where lm-eval is missing
    raise ConfigError("lm-eval is not installed", where="evotok_cli.lmeval",
                      fix="pip install 'evotok[lm-eval]' (or pip install lm-eval)") from None

from evotok_cli.lmeval.settings import (  # noqa: E402 (after the lm-eval check)
    REPEAT_STRIDE,
    WHERE,
    check_options,
    cut_at,
    harness_device,
    parse_model_args,
    scaled_settings,
)

log = logging.getLogger(__name__)

@register_model("evotok")
class EvotokLM(LM):
    """lm-eval's model interface over an evotok checkpoint and decoder (module docstring: the semantics)."""

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("the evotok lm-eval model runs in one process", where="WORLD_SIZE",
                              fix="run lm-eval without torchrun/accelerate, or shard with `evotok bench`")
        settings, options = parse_model_args(model_args)
        self.settings = settings
        self.decoder = check_options(settings.decoder, options)
        self._check_settings()
        self.model = self._load()
        self._device = self.model.device
        self._warned_sampling = False
        self._templated = False  # lm-eval asked for the chat template: its contexts hold the template's tokens

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> EvotokLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> EvotokLM:
        """model_args win over the harness's batch_size/device, which lm-eval's command line always sends
        (passing both to the constructor would be a TypeError)."""
        merged = dict(arg_dict)
        for key, value in (additional_config or {}).items():
            if value is not None and key not in merged:
                merged[key] = harness_device(value) if key == "device" else value
        return cls(**merged)

    def _check_settings(self) -> None:
        from evotok_cli.jobs.generation import check_settings
        from evotok_cli.lmeval.loglik import check_mc
        from evotok_cli.runtime.attention import PADDED_MODES
        from evotok_cli.runtime.lora import LORA_MODES
        from evotok_cli.runtime.quantize import MODES as QUANTIZE_MODES

        s = self.settings
        check_settings(self.decoder, gen_length=s.gen_length, block_length=s.block_length, steps=s.steps,
                       temperature=s.temperature)
        check_mc(s.mc_num, s.mc_batch_size)
        for key, allowed in (("lora_mode", LORA_MODES), ("padded_attention", PADDED_MODES),
                             ("quantize", QUANTIZE_MODES)):
            if getattr(s, key) not in allowed:
                raise ConfigError(f"{key}={getattr(s, key)!r} is not one of {', '.join(allowed)}", where=WHERE,
                                  fix=f"e.g. {key}=auto")
        if s.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {s.batch_size}", where=WHERE, fix="e.g. batch_size=8")
        from evotok_cli.base.threads import check_threads

        check_threads(s.threads, where=WHERE)

    def _load(self) -> Any:
        from evotok_cli.base.threads import apply as apply_threads
        from evotok_cli.jobs.config import checked_model_folder
        from evotok_cli.runtime.model import load_model

        folder = checked_model_folder(self.settings.model)
        s = self.settings
        s.threads = apply_threads(s.threads).threads  # before the load; get_model_info records it
        model = load_model(folder, adapter=s.adapter, device=s.device, dtype=s.dtype, lora_mode=s.lora_mode,
                           padded_attention=s.padded_attention, quantize=s.quantize)
        if model.tokenizer is None:
            raise CheckpointError("the checkpoint has no tokenizer, so lm-eval's text requests cannot be encoded",
                                  where=str(folder), fix="add tokenizer.json (and a chat template) to the folder")
        from evotok_cli.decoding.api import check_model_options

        check_model_options(getattr(self.decoder, "config", None), model, where=WHERE)  # k_soft <= vocabulary
        return model

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in lm-eval's results under config: what decided the generations."""
        from evotok_cli import __version__

        return {"evotok": __version__, "model_path": str(self.model.path), "family": self.model.family.name,
                "decoder_options": {k: str(v) for k, v in vars(self.decoder.config).items()},
                "evotok_settings": dataclasses.asdict(self.settings)}

    # -- chat template (lm-eval renders the chat itself under --apply_chat_template) ----------------
    @property
    def tokenizer_name(self) -> str:
        return str(self.model.path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        template = getattr(self.model.tokenizer, "chat_template", None)
        if isinstance(template, dict):
            return template.get(chat_template if isinstance(chat_template, str) else "default")
        return template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """lm-eval's messages in the checkpoint's template; without a generation prompt the last (assistant)
        message is continued, which is how a task's `gen_prefix` (e.g. "<reasoning>") is prefilled. The
        messages' text stays plain text (`runtime.tokenizer.protect`), as in `evotok bench`."""
        from evotok_cli.runtime.tokenizer import has_chat_template, render_messages

        if not has_chat_template(self.model.tokenizer):
            raise ConfigError("the checkpoint has no chat template", where=str(self.model.path),
                              fix="drop --apply_chat_template")
        self._templated = True
        return render_messages(self.model.tokenizer, chat_history, chat=True, generation_prompt=add_generation_prompt)

    def _context(self, context: str) -> str:
        """A request's context as `encode` takes it: rendered by `apply_chat_template` above (the template's
        tokens real, the messages' protected; lm-eval hands it back as a plain str, so it is marked
        `Rendered` again here), or else all task text, whose control tokens stay plain text."""
        from evotok_cli.runtime.tokenizer import Rendered, protect

        return Rendered(context) if self._templated else protect(self.model.tokenizer, context)

    # -- generate_until -----------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from tqdm import tqdm

        from evotok_cli.jobs.canvas_plan import cut_answer
        from evotok_cli.jobs.generation import generate

        jobs = self._generation_jobs(requests)
        groups: dict[tuple[int, int, int], list[dict[str, Any]]] = defaultdict(list)
        for job in jobs:
            groups[(job["gen_length"], job["block_length"], job["steps"])].append(job)
        answers = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="evotok generate_until")
        for (gen_length, block_length, steps), members in groups.items():
            shown = [0]

            def advance(done: int, _total: int, shown: list[int] = shown) -> None:
                bar.update(done - shown[0])
                shown[0] = done

            results, _ = generate(
                self.model, self.settings.decoder, self.decoder, [j["prompt"] for j in members],
                gen_length=gen_length, block_length=block_length, steps=steps,
                temperature=self.settings.temperature, seed=None, seeds=[j["seed"] for j in members],
                batch_size=self.settings.batch_size, on_batch=advance)
            for job, result in zip(members, results):
                ids, _ = cut_answer(result["token_ids"], job["max_gen_toks"], self.model.stop_ids)
                answers[job["index"]] = cut_at(self._text(ids), job["until"])
        bar.close()
        return answers

    def _generation_jobs(self, requests: list[Any]) -> list[dict[str, Any]]:
        """Encode every request and check it fits the model before anything is generated."""
        from evotok_cli.jobs.generation import check_settings
        from evotok_cli.runtime.prompts import Prompt
        from evotok_cli.runtime.tokenizer import encode

        repeats: dict[tuple[Any, Any, Any], int] = defaultdict(int)
        jobs = []
        for index, request in enumerate(requests):
            context, kwargs = request.args[0], dict(request.args[1] or {})
            self._warn_sampling(kwargs)
            canvas = scaled_settings(self.settings, self.decoder, kwargs.get("max_gen_toks"))
            gen_length = canvas.gen_length
            check_settings(self.decoder, gen_length=gen_length, block_length=canvas.block_length,
                           steps=canvas.steps, temperature=self.settings.temperature)
            doc_id = getattr(request, "doc_id", None)
            key = (getattr(request, "task_name", None), doc_id if doc_id is not None else index, request.idx)
            seed = self.settings.seed + key[1] + REPEAT_STRIDE * repeats[key]
            repeats[key] += 1
            ids = encode(self.model.tokenizer, self._context(context))
            if len(ids) + gen_length > self.model.max_length:
                raise ConfigError(f"request {index} (doc {doc_id}): prompt ({len(ids)} tokens) + gen length "
                                  f"({gen_length}) exceeds the model's maximum {self.model.max_length}",
                                  where=str(self.model.path), fix="use a smaller max_gen_toks / gen_length")
            until = kwargs.get("until") or []
            jobs.append({"index": index, "prompt": Prompt(context, ids=ids), "gen_length": gen_length,
                         "block_length": canvas.block_length, "steps": canvas.steps, "seed": seed,
                         "max_gen_toks": kwargs.get("max_gen_toks"),
                         "until": [until] if isinstance(until, str) else list(until)})
        return jobs

    def _warn_sampling(self, kwargs: dict[str, Any]) -> None:
        """Say once that the task's sampling settings are not used (model_args' temperature is)."""
        asks = kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) > 0
        if asks and not self._warned_sampling:
            self._warned_sampling = True
            log.warning("evotok: the task's do_sample/temperature are ignored; decoding at temperature=%s "
                        "from model_args", self.settings.temperature)

    def _text(self, token_ids: list[int]) -> str:
        """The answer up to the first EOS/EOT (special tokens dropped), or the whole span as bench scores it."""
        return self.model.answer_text(token_ids) if self.settings.stop_at_eos else self.model.decode(token_ids)

    # -- loglikelihood ------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from tqdm import tqdm

        from evotok_cli.lmeval.loglik import greedy_reproduces, mc_loglikelihood

        done: dict[tuple[str, str], tuple[float, bool]] = {}
        out = []
        for request in tqdm(requests, disable=disable_tqdm, desc="evotok loglikelihood"):
            stopping.check()  # a SIGTERM swallowed on its way (base/stopping.py): stop, not at the end
            key = (request.args[0], request.args[1])
            if key not in done:
                prompt, answer = self.encode_pair(*key)
                value = mc_loglikelihood(self.model, prompt, answer, mc_num=self.settings.mc_num,
                                         mc_batch_size=self.settings.mc_batch_size, seed=self.settings.seed)
                done[key] = (value, greedy_reproduces(self.model, prompt, answer))
                self.cache_hook.add_partial("loglikelihood", key, done[key])
            out.append(done[key])
        return out

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Prompt and answer ids as lm-eval's own models split them: trailing spaces of the context move to the
        continuation, the whole text is encoded and the context's tokens cut off its front. A prompt too long
        for the model loses its oldest tokens; the answer is never cut."""
        from evotok_cli.runtime.tokenizer import encode, protect

        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context, continuation = self._context(context), protect(self.model.tokenizer, continuation)
        whole = encode(self.model.tokenizer, context + continuation)
        prompt_len = len(encode(self.model.tokenizer, context))
        prompt, answer = whole[:prompt_len], whole[prompt_len:]
        if len(answer) >= self.model.max_length:
            raise ConfigError(f"a continuation of {len(answer)} tokens does not fit the model's maximum "
                              f"{self.model.max_length} with any prompt", where=str(self.model.path),
                              fix="use a task with shorter continuations")
        return prompt[max(0, len(prompt) + len(answer) - self.model.max_length):], answer

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            "evotok does not provide loglikelihood_rolling (perplexity tasks such as wikitext): a masked "
            "diffusion model has no left-to-right token probabilities; generate_until and loglikelihood "
            "(multiple-choice) tasks work")
