"""Several processes, one job: `torchrun --nproc_per_node N -m evotok_cli bench|finetune ...` (or
`accelerate launch`, which sets the same variables).

bench shards items by position (rank r takes r, r + world, ...): no padding and no duplicates, unlike
torch's DistributedSampler; its processes only meet after generating, so rank 0 can merge the sample
files over gloo. finetune splits each global batch across processes and sums gradients (gloo on CPU,
NCCL on GPUs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

BARRIER_TIMEOUT = timedelta(hours=24)  # ranks finish at different times on long evaluations


@dataclass
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started: bool = False  # a process group exists (barriers needed)
    owned: bool = False  # we created it (and destroy it at the end)

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
        if self.world > 1 and requested in ("auto", "cuda"):
            import torch
            if torch.cuda.is_available():
                return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested


def from_environment(backend: str = "gloo") -> Group:
    """The process group a launcher asked for (WORLD_SIZE > 1), joined; else a group of one."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Group()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    import torch.distributed as dist
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=BARRIER_TIMEOUT)
    return Group(rank=rank, world=world, local_rank=local_rank, started=True, owned=owned)
