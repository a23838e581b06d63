"""Log-likelihoods of an answer under a masked diffusion model, for lm-eval's `loglikelihood` requests.

A masked diffusion model gives no left-to-right token probabilities, so log p(answer | prompt) is
replaced by the lower bound that LLaDA's paper evaluates (its conditional likelihood bound, in the
low-variance form): with L answer tokens,

    log p(a | p) >= -E_{l ~ U{1..L}} E_{S: l of the L tokens, uniform} [ L/l * sum_{j in S} -log p(a_j | p, a_{-S}) ]

(a_{-S}: the answer with the positions S masked).

The prompt is never masked. We estimate it with `mc_num` samples, `mc_batch_size` per forward pass. As
in LLaDA's evaluation harness, the numbers of masked tokens within one batch are stratified rather than
drawn independently: one uniform offset k per batch, then counts spread evenly over 1..L (mod L), so
each count is still uniform on 1..L (the estimate stays unbiased) but a batch covers the range evenly.

Random draws, in this order, from a CPU generator seeded with `seed` for every request (so an estimate
does not depend on which other requests run, or on the device): per batch, `randint(1, L + 1, (1,))`
for k, then `rand(batch, L)`; row i masks count_i = (k - 1 + i * L // batch) % L + 1 answer positions,
those with the count_i smallest scores of its row. `tests/test_lm_eval.py` restates this with plain loops.

`greedy_reproduces` answers lm-eval's second question (is the answer what greedy decoding gives?) the
way LLaDA's harness does: decode the fully masked answer one token per pass, the most confident
position first (the mask token excluded from the candidates).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from evotok_cli.base.errors import ConfigError


def check_mc(mc_num: int, mc_batch_size: int, where: str = "--model_args") -> None:
    """Both positive and the batch dividing the sample count, so every request gets exactly mc_num samples."""
    for key, value in (("mc_num", mc_num), ("mc_batch_size", mc_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a whole number >= 1, got {value!r}", where=where,
                              fix=f"e.g. {key}=128" if key == "mc_num" else f"e.g. {key}=32")
    if mc_num % mc_batch_size:
        raise ConfigError(f"mc_num {mc_num} is not a multiple of mc_batch_size {mc_batch_size}", where=where,
                          fix="e.g. mc_num=128,mc_batch_size=32")


def answer_logits(model: Any, ids: torch.Tensor, prompt_len: int, answer_len: int) -> torch.Tensor:
    """Logits (B, answer_len, V) predicting the answer positions; only those rows go through the LM head.
    Shifted models (Dream) predict position i from the output at i - 1, position 0 from its own."""
    shift = int(model.shifted_logits)
    lo, hi = prompt_len - shift, prompt_len + answer_len - shift
    if lo >= 0:
        return model(ids, logits_slice=(lo, hi))
    full = model(ids)  # an empty prompt on a shifted model: position 0 reuses its own output
    return torch.cat([full[:, :1], full[:, :-1]], dim=1)[:, :answer_len]


def stratified_counts(answer_len: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """How many answer tokens each row of a batch masks: each uniform on 1..L, evenly spread in the batch."""
    k = int(torch.randint(1, answer_len + 1, (1,), generator=generator))
    rows = torch.arange(batch)
    return (k - 1 + rows * answer_len // batch) % answer_len + 1


def random_subsets(counts: torch.Tensor, answer_len: int, generator: torch.Generator) -> torch.Tensor:
    """(B, L) bool: row i marks counts[i] answer positions chosen uniformly without replacement."""
    scores = torch.rand(len(counts), answer_len, generator=generator)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return ranks < counts[:, None]


@torch.inference_mode()
def mc_loglikelihood(model: Any, prompt: list[int], answer: list[int], *, mc_num: int = 128,
                     mc_batch_size: int = 32, seed: int = 0) -> float:
    """The Monte Carlo estimate of the bound above (a log-likelihood: <= 0 in expectation).
    An empty answer has probability one: 0.0."""
    check_mc(mc_num, mc_batch_size)
    length = len(answer)
    if length == 0:
        return 0.0
    generator = torch.Generator().manual_seed(seed)
    device = model.device
    sequence = torch.tensor(prompt + answer, device=device)
    target = sequence[len(prompt):].expand(mc_batch_size, length)
    total = 0.0
    for _ in range(mc_num // mc_batch_size):
        counts = stratified_counts(length, mc_batch_size, generator)
        chosen = random_subsets(counts, length, generator)
        masked = chosen.to(device)
        ids = sequence.expand(mc_batch_size, -1).clone()
        ids[:, len(prompt):] = target.masked_fill(masked, model.mask_id)
        logits = answer_logits(model, ids, len(prompt), length)
        nll = F.cross_entropy(logits[masked].float(), target[masked], reduction="none").cpu().double()
        weight = (length / counts.double())[:, None].expand(-1, length)[chosen]  # L / l per masked token
        total += float((nll * weight).sum())
    return -total / mc_num


@torch.inference_mode()
def greedy_reproduces(model: Any, prompt: list[int], answer: list[int]) -> bool:
    """True iff unmasking the answer one token per pass, most confident first, yields exactly `answer`
    (stops at the first wrong token: committed tokens never change)."""
    length = len(answer)
    ids = torch.tensor([prompt + [model.mask_id] * length], device=model.device)
    start = len(prompt)
    for _ in range(length):
        logits = answer_logits(model, ids, start, length)[0].float()
        logits[:, model.mask_id] = float("-inf")
        confidence, choice = logits.softmax(dim=-1).max(dim=-1)
        confidence[ids[0, start:] != model.mask_id] = float("-inf")
        j = int(confidence.argmax())
        if int(choice[j]) != answer[j]:
            return False
        ids[0, start + j] = choice[j]
    return True
