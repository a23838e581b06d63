"""What the step engine does when memory runs out (`MemoryHandling`, a part of `Engine`): a step's shared
forward that fails is split in two (jobs), a job alone is run over halves of its rows (a merged program is
one job of many rows), and as a last resort other jobs are preempted by recompute (their KV slots dropped,
their cached passes replayed when they are admitted again). Also the default token budget."""
from __future__ import annotations

from typing import Any

import torch

from evotok_cli.decoding.passes import ForwardPass, join_rows, kept_copies, split_rows
from evotok_cli.decoding.rows import run_rows

Job = Any  # decoding/stepper.py's Job (which imports this module)


class MemoryHandling:
    """The engine's memory policy, over the state `Engine` keeps (live, queue, lock, pool, model, budget)."""

    def _run_shared(self, jobs: list[Job]) -> list[tuple[Job, torch.Tensor | None, BaseException | None]]:
        """The step's one forward over `jobs` (a preempted job's next pass is the oldest it must run again).
        When it fails (out of memory, or one job's pass is bad), it is split in two and each half retried,
        so that only a job whose own pass fails gets the error; a job that runs out of memory alone is run
        over halves of its rows (`_split_by_rows`), and when even one row does not fit, preempts other live
        jobs holding KV slots (`_preempt`), youngest first. Re-running a pass is harmless: its window's keys
        and values are written again, the same ones."""
        jobs = [j for j in jobs if j in self.live]  # one preempted earlier in this step waits (no logits)
        if not jobs:
            return []
        try:
            self.passes += 1
            logits = run_rows(self.model, [(j.id, j.replay[0] if j.replay else j.pending) for j in jobs], self.pool)
            return [(j, lg, None) for j, lg in zip(jobs, logits)]
        except Exception as exc:
            if not _out_of_memory(exc):
                if len(jobs) == 1:
                    return [(jobs[0], None, exc)]
            else:
                self._count_retry()
                if len(jobs) == 1:
                    split = self._split_by_rows(jobs[0])  # a merged program's rows: fewer per forward
                    if split is not None:
                        return [split]
                    victims = [j for j in self.live if j is not jobs[0] and j.log]
                    if not victims:
                        return [(jobs[0], None, exc)]
                    self._preempt(victims[-1])  # the youngest: it has done the least work
                    self.max_tokens = max(1, self.live_tokens)  # what did fit: admit no more than that
                    return self._run_shared(jobs)
            half = len(jobs) // 2
            return self._run_shared(jobs[:half]) + self._run_shared(jobs[half:])

    def _split_by_rows(self, job: Job) -> tuple[Job, torch.Tensor | None, BaseException | None] | None:
        """A job alone out of memory whose pass has several rows (a merged program is one job): its pass run
        over halves of its rows (`split_rows`), halved again while memory runs out. None when it cannot be
        split, or runs out of memory at one row (then other jobs are preempted)."""
        p = job.replay[0] if job.replay else job.pending
        halves = split_rows(p)
        if halves is None:
            return None
        try:
            return job, join_rows(p, [self._run_by_rows(job, half) for half in halves]), None
        except Exception as exc:
            return None if _out_of_memory(exc) else (job, None, exc)

    def _run_by_rows(self, job: Job, p: ForwardPass) -> torch.Tensor:
        try:
            return run_rows(self.model, [(job.id, p)], self.pool)[0]
        except Exception as exc:
            halves = split_rows(p) if _out_of_memory(exc) else None
            if halves is None:
                raise
            self._count_retry()
            return join_rows(p, [self._run_by_rows(job, half) for half in halves])

    def _count_retry(self) -> None:
        """A forward ran out of memory and is retried smaller: count it, and hand the allocator's cached
        blocks back so the retry can use them."""
        self.retries += 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- preemption by recompute -----------------------------------------------------------------
    def _remember(self, ran: list[tuple[Job, torch.Tensor]]) -> None:
        """Keep the cached passes that ran (their inputs copied: a program may reuse its tensors in place), so
        that each job's slots can be rebuilt. A pass that feeds the whole canvas writes every slot position
        from its own inputs alone: the passes before it (or before a new `kv_memory`) are no longer needed."""
        jobs = [job for job, _ in ran if job.pending.kv_length is not None and job.pending.cache is None]
        for job, kept in zip(jobs, kept_copies([job.pending for job in jobs])):
            if job.log and job.log[-1].kv_memory != kept.kv_memory:
                job.log = []
            if kept.start == 0 and kept.length >= kept.kv_length and kept.windows is None:  # whole: the earlier
                # passes are not needed (a pass with `windows` may leave rows out: never whole)
                job.log = [kept]
            else:
                job.log.append(kept)  # `_admit` replays a copy of the list

    def _preempt(self, job: Job) -> None:
        """Drop a live job's KV slots and put it back at the front of the queue. Diffusion rows are
        recomputed from their inputs: when it is admitted again, the cached passes it ran since its slots
        were last fed whole run again first (one per step, sharing the step's forward, their logits
        dropped), which writes exactly the keys and values it had; then its pending pass runs as if
        nothing happened. Its tokens and NFE are those of an uninterrupted run; it costs those passes."""
        self.pool.free(job.id)
        job.replay, job.preempted = [], True
        if job in self.live:
            self.live.remove(job)
        with self.lock:
            self.queue.appendleft(job)
        self.preemptions += 1

    def _preempt_to_budget(self) -> None:
        """When the live jobs hold more tokens than the budget (it was lowered: by hand, or after running
        out of memory), preempt the youngest until they fit; one job always keeps running."""
        while self.max_tokens is not None and len(self.live) > 1 and self.live_tokens > self.max_tokens:
            self._preempt(self.live[-1])


CPU_TOKENS_IN_FLIGHT = 1 << 16  # canvas positions in flight on a CPU: RAM is rarely what limits it


def default_tokens_in_flight(model: Any, fraction: float = 0.8) -> int:
    """The token budget when none is given: a fixed number on the CPU; on CUDA what `fraction` of the free
    device memory holds at the bytes a canvas position costs (its K and V in every layer, twice: the
    pool, and the activations and logits of the step's forward around it)."""
    device = getattr(model, "device", torch.device("cpu"))
    if device.type != "cuda":
        return CPU_TOKENS_IN_FLIGHT
    free, _ = torch.cuda.mem_get_info(device)
    per_token = 2 * model.new_cache(1, 1).nbytes
    return max(1, int(free * fraction) // per_token)


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
