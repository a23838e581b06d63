"""How many CPU threads torch uses, chosen once per process before any work starts.

torch's default is one thread per core. On a machine another busy process shares, its threads then wait on
each other (OpenMP's barriers spin while a core is taken), and a decode runs about 3x slower than with one
thread (issue 31: 3.4-4.7 s against 1.0-1.4 s on 2 cores with one competing process). torchrun sets
OMP_NUM_THREADS=1 per process for the same reason. The default here is therefore half the cores this
process may use (never the whole machine), split between the ranks started on this node, at most
`MAX_DEFAULT`; `--threads N` or EVOTOK_THREADS choose exactly. benchmarks/threads.py measures the rule.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

from evotok_cli.base.errors import ConfigError

ENV = "EVOTOK_THREADS"
MAX_DEFAULT = 8  # more threads rarely pay on the small matrices of one decode step; --threads N goes higher
THREADS_HELP = ("CPU threads torch uses (env EVOTOK_THREADS); default: half the usable physical cores, "
                "split between ranks, at most 8; see `evotok info --system`")


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count and why: what `evotok info --system` prints and provenance records."""

    threads: int
    reason: str
    cores: int  # physical cores this process may use
    affinity: int  # logical CPUs in its affinity mask
    ranks: int  # processes started on this node (LOCAL_WORLD_SIZE)

    def record(self) -> dict[str, object]:
        return {"threads": self.threads, "threads_reason": self.reason}


def affinity_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def physical_cores(cpus: set[int]) -> int:
    """Distinct physical cores among `cpus` (hyper-threads of one core count once), from sysfs; the logical
    count where the topology cannot be read."""
    seen = set()
    for cpu in cpus:
        base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            seen.add((base.joinpath("physical_package_id").read_text().strip(),
                      base.joinpath("core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return len(seen) or len(cpus)


def cgroup_cpus() -> int | None:
    """The container's CPU quota (cgroup v2 cpu.max, e.g. `docker --cpus 2`) as whole CPUs, or None."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def local_ranks() -> int:
    """Processes of this job on this node: torchrun and accelerate set LOCAL_WORLD_SIZE."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def check_threads(value: object, where: str = "--threads") -> int | None:
    """A thread count >= 1, None (the default), or one ConfigError."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if n < 1 or isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"threads must be a whole number >= 1, got {value!r}", where=where,
                          fix="e.g. 1; unset for the default, see `evotok info --system`")
    return n


def choose(requested: int | None = None) -> ThreadChoice:
    """The thread count for this process: `requested` (a flag or EVOTOK_THREADS), else OMP_NUM_THREADS when
    set (torchrun sets 1), else half the usable physical cores split between the node's ranks, 1..8."""
    cpus = affinity_cpus()
    cores = physical_cores(cpus)
    quota = cgroup_cpus()
    if quota is not None:
        cores = min(cores, quota)
    ranks = local_ranks()
    facts = {"cores": cores, "affinity": len(cpus), "ranks": ranks}
    if requested is not None:
        return ThreadChoice(requested, "asked for (--threads / EVOTOK_THREADS / threads=)", **facts)
    env = check_threads(os.environ.get(ENV), ENV)
    if env is not None:
        return ThreadChoice(env, f"{ENV}={env}", **facts)
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return ThreadChoice(int(omp), f"OMP_NUM_THREADS={omp} (torchrun sets 1 per process)", **facts)
    per_rank = max(1, cores // ranks)
    n = max(1, min(per_rank // 2, MAX_DEFAULT))
    why = (f"half of {per_rank} usable physical core{'s' if per_rank != 1 else ''}"
           + (f" ({cores} split between {ranks} ranks)" if ranks > 1 else "")
           + f", at least 1, at most {MAX_DEFAULT}: a busy neighbour then slows a decode little, where a thread "
           "per core runs about 3x slower")
    return ThreadChoice(n, why, **facts)


_applied: ThreadChoice | None = None


def apply(requested: int | None = None) -> ThreadChoice:
    """Choose and set torch's intra-op (and, once per process, inter-op) threads; returns the choice for
    provenance. Called by each compute command before its model loads."""
    global _applied
    import torch

    choice = choose(check_threads(requested))
    torch.set_num_threads(choice.threads)
    with contextlib.suppress(RuntimeError):  # settable once, before any inter-op work: a later call keeps it
        torch.set_num_interop_threads(choice.threads)
    _applied = choice
    return choice


def applied() -> ThreadChoice | None:
    """The last choice `apply` made in this process (None before any)."""
    return _applied


def system_facts() -> dict[str, object]:
    """What `evotok info --system` prints: the cores, the thread choice and its reason, the variables that
    change it, torch's own default, and the accelerators with their free memory."""
    import torch

    choice = choose()
    facts: dict[str, object] = {
        "physical_cores": choice.cores, "affinity_cpus": choice.affinity, "ranks_on_node": choice.ranks,
        "threads": choice.threads, "threads_reason": choice.reason,
        "env": {k: os.environ[k] for k in (ENV, "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE") if k in os.environ} or None,
        "torch": torch.__version__, "torch_default_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        devices = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            devices.append(f"cuda:{i} {torch.cuda.get_device_name(i)}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB "
                           "free")
        facts["cuda"] = devices
    else:
        facts["cuda"] = None
    return facts
