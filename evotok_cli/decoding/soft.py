"""Token states and soft input embeddings (EvoToken-DLM, spec 1.2-1.3).

A position's input is a list of (token id, weight) pairs: k top candidates of the latest prediction plus
one slot for its own discrete token. The mask slot weighs exactly `alpha` while the position is still
[MASK] (state Soft([MASK]+V)), and 0 once a token is decoded (state Soft(V), a renormalised top-k
mixture). Positions before the current block are one-hot on their token ([Decode]).
"""

from __future__ import annotations

import torch

from evotok_cli.decoding.schedule import logsumexp64

MASK, SOFT_MASK, SOFT, DECODED = "mask", "soft_mask", "soft", "decoded"


def top_k_probabilities(logits: torch.Tensor, k: int, exclude: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most probable tokens and their float64 probabilities under softmax(logits), from a top-k
    of the logits and a log-sum-exp: no float64 softmax over the vocabulary is materialised.

    With `exclude`, that token gets probability 0 (EvoToken at temperature 0 sets the mask logit to -inf).
    """
    scores = _without(logits, exclude)
    values, ids = torch.topk(scores, k, dim=-1)  # (B, L, k)
    probs = (values.to(torch.float64) - logsumexp64(scores)[..., None]).exp()
    return probs, ids


def top_k_relative(logits: torch.Tensor, k: int, exclude: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most probable tokens and their float64 probabilities relative to the best one, exp(l_i - l_1).

    A soft input's weights are ratios of top-k probabilities (spec 1.3), so softmax's normaliser cancels:
    positions that are only fed back (future blocks, Q3) never need a log-sum-exp over the vocabulary.
    `exclude` as in `top_k_probabilities`.
    """
    values, ids = torch.topk(_without(logits, exclude), k, dim=-1)
    values = values.to(torch.float64)
    return (values - values[..., :1]).exp(), ids


def _without(logits: torch.Tensor, exclude: int | None) -> torch.Tensor:
    """The logits with column `exclude` at -inf, on a copy (the caller's tensor is left as it is)."""
    if exclude is None:
        return logits
    scores = logits.clone()
    scores[..., exclude] = float("-inf")
    return scores


def soft_weights(probs: torch.Tensor, ids: torch.Tensor, tokens: torch.Tensor, mask_id: int,
                 alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(k+1) ids and float64 weights per position, in the release's order of operations: append the
    own-token slot with raw weight S/(1-alpha)*alpha if it is [MASK] (S = top-k mass) else 0, then
    divide by the sum. Masked: ((1-alpha) q/S, alpha); decoded: (q/S, 0). `probs` may be scaled per
    position (e.g. `top_k_relative`): the weights are the same."""
    total = probs.sum(dim=-1, keepdim=True)  # (B, L, 1)
    extra = torch.where(tokens[..., None] == mask_id, total / (1 - alpha) * alpha, torch.zeros_like(total))
    weights = torch.cat([probs, extra], dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return torch.cat([ids, tokens[..., None]], dim=-1), weights


def one_hot_slots(tokens: torch.Tensor, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[Decode] inputs: all weight on the own-token slot."""
    ids = tokens[..., None].expand(*tokens.shape, k + 1).clone()
    weights = torch.zeros(*tokens.shape, k + 1, dtype=dtype, device=tokens.device)
    weights[..., -1] = 1
    return ids, weights


def input_states(ids: torch.Tensor | None, weights: torch.Tensor | None, tokens: torch.Tensor,
                 mask_id: int) -> list[str]:
    """The state of each position's input, read off what is fed: hard ids (first pass) or soft slots."""
    if ids is None:
        return [MASK if t == mask_id else DECODED for t in tokens.tolist()]
    states = []
    for own, last_w, rest in zip(ids[:, -1].tolist(), weights[:, -1].tolist(), weights[:, :-1].abs().sum(-1).tolist()):
        if rest == 0 and last_w > 0:  # one-hot: [Decode], or a hard [MASK] (d2f's new blocks, ablations)
            states.append(MASK if own == mask_id else DECODED)
        elif own == mask_id:
            states.append(SOFT_MASK)
        else:
            states.append(SOFT)
    return states
