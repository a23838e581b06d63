"""Build a small byte-level BPE tokenizer with LLaDA's special tokens and chat template (or, with
`chatml=True`, Dream's special tokens and a ChatML template).

The bundled model and the tests' tiny checkpoints use it, so their tokenizers load through exactly the
code path of the real LLaDA / Dream tokenizers (`tokenizer.json` + `tokenizer_config.json` +
`chat_template.jinja`). Digits are split one per token: small models learn arithmetic far better that way.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

BOS, EOS, MASK = "<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
SPECIAL_TOKENS = (BOS, EOS, MASK, START_HEADER, END_HEADER, EOT)

# LLaDA-8B-Instruct's template (Llama-3 style): BOS, then header/content/eot per message.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


# Dream's special tokens (Qwen2's ChatML markers plus a mask token) and a ChatML template with Qwen2's
# default system message.
IM_START, IM_END, DREAM_MASK = "<|im_start|>", "<|im_end|>", "<|mask|>"
CHATML_SPECIAL_TOKENS = (EOS, IM_START, IM_END, DREAM_MASK)
CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(corpus: Iterable[str], folder: str | Path, *, vocab_size: int = 512,
                    model_max_length: int = 4096, chatml: bool = False):
    """Train BPE on `corpus`, save the Hugging Face files into `folder`, return the loaded tokenizer.

    `chatml=True` gives Dream's special tokens (no BOS, mask `<|mask|>`, end of turn `<|im_end|>`) and a
    ChatML template instead of LLaDA's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=list(CHATML_SPECIAL_TOKENS if chatml else SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(list(corpus), trainer=trainer)
    if chatml:
        fast = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=EOS, mask_token=DREAM_MASK,
                                       model_max_length=model_max_length, additional_special_tokens=[IM_START, IM_END])
        fast.chat_template = CHATML_TEMPLATE
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                       mask_token=MASK, model_max_length=model_max_length,
                                       additional_special_tokens=[START_HEADER, END_HEADER, EOT])
        fast.chat_template = LLAMA3_CHAT_TEMPLATE
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return fast
