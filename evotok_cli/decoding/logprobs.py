"""Log-probabilities of the generated tokens, as the decoder had them when it wrote them (`TokenLogprob`).

A diffusion decoder writes a position at one pass and may rewrite it later (EvoToken's revisions, d2f's soft
mode), so a token's log-probability is read from the pass that wrote it for the last time: every pass
overwrites the record of the positions it committed or revised, and what is left at the end is the final
writes'. The record is kept on the device and read back once, when the row is done; a request without
`logprobs` builds no recorder and pays nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from evotok_cli.decoding.api import GenerationRequest, TokenLogprob
from evotok_cli.decoding.schedule import logsumexp64


class LogprobRecorder:
    """Per canvas position of `rows` rows: the log-probability of its token and the `top` most probable
    tokens with theirs, at the last pass that wrote it (NaN and nothing where no pass did)."""

    def __init__(self, rows: int, length: int, top: int, vocab: int, device: torch.device):
        self.top = top = min(top, vocab - 1)  # every token but [MASK]
        self.logprob = torch.full((rows, length), float("nan"), dtype=torch.float64, device=device)  # (B, L)
        self.top_ids = torch.zeros((rows, length, top), dtype=torch.long, device=device)  # (B, L, N)
        self.top_logprobs = torch.zeros((rows, length, top), dtype=torch.float64, device=device)  # (B, L, N)

    def record(self, logits: torch.Tensor, start: int, written: torch.Tensor, tokens: torch.Tensor,
               mask_id: int) -> None:
        """One pass: `logits` (B, n, V) of canvas columns [start, start + n), `written` (B, n) the positions
        this pass committed or revised, `tokens` (B, n) the tokens after the pass. The distribution is the
        log-softmax of the logits at temperature 1 with [MASK] left out (no decoder can write it)."""
        scores = logits.clone()  # the caller's logits stay as they are
        scores[..., mask_id] = float("-inf")
        norm = logsumexp64(scores)  # (B, n) float64
        own = scores.gather(-1, tokens[..., None]).squeeze(-1).to(torch.float64) - norm
        cols = slice(start, start + logits.shape[1])
        self.logprob[:, cols] = torch.where(written, own, self.logprob[:, cols])
        if self.top > 0:
            values, ids = scores.topk(self.top, dim=-1)  # (B, n, top), most probable first
            keep = written[..., None]
            self.top_ids[:, cols] = torch.where(keep, ids, self.top_ids[:, cols])
            self.top_logprobs[:, cols] = torch.where(keep, values.to(torch.float64) - norm[..., None],
                                                     self.top_logprobs[:, cols])

    def row(self, row: int, start: int) -> list[TokenLogprob | None]:
        """The records of one row's positions from canvas column `start` (the generated span) on."""
        logprobs = self.logprob[row, start:].tolist()
        ids = self.top_ids[row, start:].tolist()
        values = self.top_logprobs[row, start:].tolist()
        return [None if lp != lp else TokenLogprob(lp, list(zip(i, v))) for lp, i, v in zip(logprobs, ids, values)]


def recorder_for(request: GenerationRequest, rows: int, length: int, model: Any) -> LogprobRecorder | None:
    """A recorder over a canvas of `rows` x `length` when the request asks for logprobs, else None."""
    if request.logprobs is None:
        return None
    return LogprobRecorder(rows, length, request.logprobs, model.vocab_size, model.device)
