"""Several processes, one job: `torchrun --nproc_per_node N -m evotok_cli bench|finetune ...` (or
`accelerate launch`, which sets the same variables).

bench shards items by position (rank r takes r, r + world, ...): no padding and no duplicates, unlike
torch's DistributedSampler; its processes only meet after generating, so rank 0 can merge the sample
files over gloo. finetune splits each global batch across processes and sums gradients (gloo on CPU,
NCCL whenever the process's device is a GPU).

Each process of a multi-process job owns GPU LOCAL_RANK: `auto` and `cuda` map to it, and the device is
made current (`torch.cuda.set_device`) before the process group starts, so NCCL and FSDP allocate on it
rather than on GPU 0. An explicit `cuda:N` would put every process on the same GPU and is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from evotok_cli.base.errors import ConfigError

BARRIER_TIMEOUT = timedelta(hours=24)  # bench: ranks finish at different times on long evaluations
TRAIN_TIMEOUT_MINUTES = 30.0  # finetune: ranks meet every step, so a longer wait means a hung job


@dataclass
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started: bool = False  # a process group exists (barriers needed)
    owned: bool = False  # we created it (and destroy it at the end)
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list[Any]) -> list[Any]:
        return items[self.rank::self.world]

    def barrier(self) -> None:
        if self.started:
            import torch.distributed as dist
            dist.barrier()

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist
            dist.destroy_process_group()
            self.started = self.owned = False

    def device(self, requested: str) -> str:
        """Each process its own GPU under a launcher (cuda -> cuda:LOCAL_RANK)."""
        return rank_device(requested, self.local_rank, self.world)


def rank_device(requested: str, local_rank: int, world: int) -> str:
    """The device of one process of `world`: `auto`/`cuda` -> `cuda:LOCAL_RANK` when there are GPUs;
    `cuda:N` is refused with more than one process (they would all share GPU N)."""
    if world <= 1:
        return requested
    import torch

    name = requested.strip().lower()
    if name.startswith("cuda:"):
        raise ConfigError(f"{requested} would put all {world} processes on the same GPU", where="--device",
                          fix="use --device cuda (each process takes GPU LOCAL_RANK); pick GPUs with "
                              "CUDA_VISIBLE_DEVICES")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return requested


def timeout_from(minutes: float | None) -> timedelta:
    """How long a collective may wait for the slowest process before the job fails."""
    return timedelta(minutes=TRAIN_TIMEOUT_MINUTES if minutes is None else minutes)


def _ranks() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0"))
    return world, rank, int(os.environ.get("LOCAL_RANK", str(rank)))


def from_environment(backend: str | None = "gloo", *, device: str | None = None,
                     timeout: timedelta = BARRIER_TIMEOUT) -> Group:
    """The process group a launcher asked for (WORLD_SIZE > 1), joined; else a group of one.

    With `device` (a --device value), the process's own device is chosen first and, if it is a GPU, made
    current before the group starts; the backend is then NCCL for a GPU and gloo otherwise."""
    world, rank, local_rank = _ranks()
    if world <= 1:
        if device is not None and device.strip().lower().startswith("cuda:"):
            _bind(device)  # cuda:N alone: N is current too (its random state is the one checkpoints keep)
        return Group()
    if device is not None:
        mine = rank_device(device, local_rank, world)
        backend = _bind(mine)
    import torch.distributed as dist
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend or "gloo", rank=rank, world_size=world, timeout=timeout)
    return Group(rank=rank, world=world, local_rank=local_rank, started=True, owned=owned,
                 backend=backend or "gloo")


def _bind(device: str) -> str:
    """Make a GPU device current for this process (before any CUDA allocation); its backend."""
    import torch

    if not device.startswith("cuda"):
        return "gloo"
    from evotok_cli.runtime.device import resolve_device

    resolved = resolve_device(device)
    torch.cuda.set_device(resolved)
    return "nccl"
