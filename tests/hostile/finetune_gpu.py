"""Hostile fine-tunes for the GPU flags: --activation-checkpointing, --pg-timeout (and EVOTOK_PG_TIMEOUT),
--device under a launcher (WORLD_SIZE > 1: refused before any process group starts), and --resume of a
checkpoint written shard by shard by --fsdp. (--full against a GPU's memory needs a GPU, or a faked one:
tests/test_finetune_gpu.py.)"""

from __future__ import annotations

from tests.hostile import Case
from tests.hostile.finetune import config, data_file, edit_state, ft, resume

LAUNCHED = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}


def flag(case_id: str, extra: list[str], expect: str, env: dict[str, str] | None = None) -> Case:
    return Case(f"finetune-gpu-{case_id}", ft(*extra), expect, data_file, env=env or {})


CASES = [
    # --pg-timeout
    flag("pg-timeout-zero", ["--pg-timeout", "0"], "--pg-timeout: must be > 0 minutes and finite"),
    flag("pg-timeout-negative", ["--pg-timeout", "-5"], "--pg-timeout: must be > 0 minutes"),
    flag("pg-timeout-infinite", ["--pg-timeout", "inf"], "--pg-timeout: must be > 0 minutes and finite"),
    flag("pg-timeout-nan", ["--pg-timeout", "nan"], "--pg-timeout: must be > 0 minutes and finite"),
    flag("pg-timeout-not-a-number", ["--pg-timeout", "soon"], "Invalid value for '--pg-timeout'"),
    flag("pg-timeout-env-not-a-number", [], "Invalid value for '--pg-timeout'", env={"EVOTOK_PG_TIMEOUT": "soon"}),
    flag("pg-timeout-env-zero", [], "--pg-timeout: must be > 0 minutes", env={"EVOTOK_PG_TIMEOUT": "0"}),
    Case("finetune-gpu-pg-timeout-config-text", ft("--config", "{tmp}/c.yaml"), "pg_timeout: expected float",
         config("pg_timeout: soon\n")),
    Case("finetune-gpu-pg-timeout-config-negative", ft("--config", "{tmp}/c.yaml"), "--pg-timeout: must be > 0",
         config("pg_timeout: -1\n")),
    # --activation-checkpointing
    flag("activation-checkpointing-with-a-value", ["--activation-checkpointing", "yes"],
         "unexpected extra argument"),
    Case("finetune-gpu-activation-checkpointing-config-text", ft("--config", "{tmp}/c.yaml"),
         "activation_checkpointing: expected bool", config("activation_checkpointing: maybe\n")),
    Case("finetune-gpu-activation-checkpointing-config-number", ft("--config", "{tmp}/c.yaml"),
         "activation_checkpointing: expected bool", config("activation_checkpointing: 1\n")),
    # --device under torchrun / accelerate launch (two processes)
    flag("device-one-gpu-for-all-processes", ["--device", "cuda:0"], "cuda:0 would put all 2 processes on the same GPU",
         env=LAUNCHED),
    flag("device-one-gpu-for-all-processes-fsdp", ["--device", "cuda:1", "--fsdp"],
         "cuda:1 would put all 2 processes on the same GPU", env=LAUNCHED),
    flag("device-cuda-without-gpus-launched", ["--device", "cuda"], "CUDA was asked for but is not available",
         env=LAUNCHED),
    # --resume of an FSDP checkpoint
    Case("finetune-gpu-resume-sharded-without-fsdp", resume(), "the checkpoint was saved by 2 processes with --fsdp",
         edit_state(lambda s: s.update(shards=2))),
    Case("finetune-gpu-resume-shards-not-a-count", resume(), "'shards' should be a count, got \"two\"",
         edit_state(lambda s: s.update(shards="two"))),
    Case("finetune-gpu-resume-shards-zero", resume(), "'shards' should be a count, got 0",
         edit_state(lambda s: s.update(shards=0))),
]
