"""Continuous trajectory supervision (EvoToken's CTS, spec 2.2-2.3), faithful to the release.

Per batch: pick a training block [start, end] in each response, keep a random subset of it clean, mask
the rest and everything after it, plan a random decode order, then unroll K passes. Each pass is
supervised with cross-entropy against the ground truth on the whole block; between passes the argmax is
written at the planned positions and the soft state (top-k mixtures, alpha ~ U(0.5, 1) per sample,
revision rule) is rebuilt under no-grad, exactly as at inference. The release keeps all K graphs alive
until one backward; we backpropagate each pass as soon as its loss exists (the gradient is the same,
activation memory is K times smaller).

Quirks kept: the argmax may be [MASK] (T2); stored confidences start at 0 and are not set when a token
is decoded, so the first revision overwrites every non-masked block position, clean ones included.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from evotok_cli.decoding.evolution import evolve
from evotok_cli.training.objectives import Batch

if TYPE_CHECKING:
    from evotok_cli.runtime.model import DiffusionModel


@dataclass
class CTSSettings:
    trajectory_steps: int = 4  # K, the paper's delta-tau
    decode_counts: list[int] | None = None  # tokens decoded per pass, drawn once per batch
    block_sizes: list[int] | None = None  # training block length L, drawn once per batch
    alpha_range: tuple[float, float] = (0.5, 1.0)
    k_soft: int = 3


@dataclass
class CTSPlan:
    """What the collator decided for one batch."""

    masked_ids: torch.Tensor  # (B, N) the initial state X(0)
    starts: list[int]
    length: int  # L, the same for every sample
    decode_at: list[list[list[int]]]  # [pass][sample] -> positions decoded after that pass
    per_pass: int


def prompt_overlap_warning(trajectory_steps: int, decode_counts: list[int], window: int) -> str | None:
    """A warning when some batches' training blocks cannot fit the response window. `plan_batch` needs a
    block of more than K x (tokens per pass) positions; a longer block than the window starts inside the
    prompt (the release's rule), so the adapter is trained to recover masked prompt tokens: with K = 8 and
    8 tokens per pass on 48-token responses, every row whose prompt is within 17 tokens of the batch's
    longest."""
    worst = trajectory_steps * max(decode_counts)
    if worst < window:
        return None
    fits = [c for c in decode_counts if trajectory_steps * c < window]
    fix = (f"--decode-counts {','.join(map(str, fits))}" if fits else "fewer --trajectory-steps") + \
        " or a longer --response-length"
    return (f"CTS: {trajectory_steps} passes x {max(decode_counts)} tokens = {worst} >= the {window}-token response "
            f"window: batches that draw {max(decode_counts)} train on blocks that start inside the prompt "
            f"(the release's rule); to keep blocks in the response use {fix}")


def plan_batch(batch: Batch, settings: CTSSettings, mask_id: int, rng: random.Random) -> CTSPlan:
    """Spec 2.2 steps 4-6: block length, start, clean subset and decode order per sample."""
    ids = batch.ids
    B, N = ids.shape
    K = settings.trajectory_steps
    per_pass = rng.choice(settings.decode_counts or [1, 2, 4, 8])
    length = rng.choice(settings.block_sizes or [512])
    prompt_lengths = batch.prompt_lengths.tolist()
    length = min(length, N - max(prompt_lengths))
    if K * per_pass >= length:
        length = K * per_pass + 1
    if length > N:
        from evotok_cli.base.errors import DataError
        raise DataError(f"a batch has only {N - max(prompt_lengths)} response tokens, CTS needs {length}",
                        where="--min-response",
                        fix=f"skip short examples with --min-response {K * per_pass + 1} or more")
    masked = ids.clone()
    starts, plans = [], [[] for _ in range(K)]
    for b in range(B):
        low, high = prompt_lengths[b], N - length
        start = rng.randint(low, high) if low <= high else high
        order = list(range(length))
        rng.shuffle(order)
        clean = rng.randint(0, length - K * per_pass)
        for offset in order[clean:]:
            masked[b, start + offset] = mask_id
        masked[b, start + length:] = mask_id
        for j in range(K):
            chunk = order[clean + j * per_pass: clean + (j + 1) * per_pass]
            plans[j].append([start + o for o in chunk])
        starts.append(start)
    return CTSPlan(masked, starts, length, plans, per_pass)


def _soft_state(logits: torch.Tensor, x: torch.Tensor, conf: torch.Tensor, starts: list[int], *, mask_id: int,
                k: int, alphas: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Revision + soft inputs for the next pass (spec 2.3 step 4), under no-grad, in place on x/conf: the
    EvoToken rule with CTS's arguments (argmax candidates, [MASK] included (T2); no commit, the planned
    positions are already decoded; revision from each block start; one alpha per sample)."""
    cols = torch.arange(x.shape[1], device=x.device)[None, :]
    start = torch.tensor(starts, device=x.device)[:, None]
    step = evolve(logits, x, conf, mask_id=mask_id, candidates="cts", live=cols >= start, k=k, alpha=alphas,
                  frozen=cols < start)
    x.copy_(step.tokens)
    conf.copy_(step.confidence)
    return step.soft_ids, step.soft_weights


def cts_step(trainable: torch.nn.Module, model: DiffusionModel, batch: Batch, settings: CTSSettings, *,
             rng: random.Random, scale: float = 1.0, rows: slice = slice(None)) -> tuple[torch.Tensor, list[float]]:
    """Run the K unrolled passes, backpropagating each (times `scale`); return the mean loss and the
    per-pass losses. Data parallel: the plan and the alphas are drawn for the whole (global) batch, this
    process unrolls `rows`, and its losses are its share of the global means. The passes call the
    transformer directly: LoRA layers live inside its modules, so the adapter trains all the same
    (`trainable` is in the signature so that every objective takes the same arguments)."""
    transformer = model.net
    mask_id = model.mask_id
    plan = plan_batch(batch, settings, mask_id, rng)
    K = settings.trajectory_steps
    global_batch = batch.ids.shape[0]
    picked = list(range(global_batch))[rows]
    x = plan.masked_ids[rows].clone()
    starts = [plan.starts[b] for b in picked]
    conf = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    soft: tuple[torch.Tensor, torch.Tensor] | None = None
    supervised = torch.zeros_like(x, dtype=torch.bool)
    for b, s in enumerate(starts):
        supervised[b, s:s + plan.length] = True
    targets = batch.ids[rows][supervised]
    losses: list[float] = []
    for j in range(K):
        # pass 0 feeds hard ids ([MASK] included); later passes the soft state of the previous one
        fed = {"input_ids": x} if soft is None else {"soft_inputs": (soft[0], soft[1].to(model.dtype))}
        logits = transformer(**fed)
        # cross-entropy averaged over the global batch's B * L supervised positions
        loss = F.cross_entropy(logits[supervised].float(), targets, reduction="sum") / (global_batch * plan.length)
        (loss * scale / K).backward()
        losses.append(float(loss.detach()))
        with torch.no_grad():
            detached = logits.detach()
            prediction = detached.argmax(-1)
            for local, b in enumerate(picked):
                cols = plan.decode_at[j][b]
                x[local, cols] = prediction[local, cols]
            alphas = [rng.uniform(*settings.alpha_range) for _ in range(global_batch)]
            if j < K - 1:  # the state after the last pass is discarded
                # U(0.5, 1) can return 1.0, where the release divides by zero (Q12): stay just below 1
                soft = _soft_state(detached, x, conf, starts, mask_id=mask_id, k=settings.k_soft,
                                   alphas=[min(alphas[b], 1 - 1e-6) for b in picked])
        # the next pass must not run with this one's (B, N, vocab) logits still alive
        del logits, detached, prediction
    return torch.tensor(sum(losses) / K), losses
