"""`evotok finetune`: one training loop for every objective, LoRA (through peft) or full.

Order of a step: micro-batches in a fixed, seeded order (epoch permutation), one backward per objective
pass, gradient accumulation, clipping, AdamW, linear schedule with warmup. Checkpoints carry everything
needed to continue bit-for-bit; SIGINT/SIGTERM save one before exiting. `preflight` checks the data file
and the output folder before the model loads (see `runs`: one run per folder).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import torch

from evotok_cli.errors import ConfigError
from evotok_cli.files import atomic_write_text, input_file, output_dir
from evotok_cli.training import checkpointing, runs
from evotok_cli.training.data import Example, load_examples
from evotok_cli.training.objectives import Batch, collate


@dataclass
class TrainConfig:
    data: str
    model: str
    out: str
    objective: str = "cts"
    full: bool = False
    lora_r: int = 128
    lora_alpha: float = 256.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    adapter: str | None = None  # start from (merge) this adapter before training
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup: int = 0
    batch_size: int = 2
    grad_accum: int = 4
    max_length: int = 1024
    min_response: int = 1
    response_length: int | None = None
    max_grad_norm: float = 1.0
    trajectory_steps: int = 4
    decode_counts: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    block_sizes: list[int] = field(default_factory=lambda: [512])
    alpha_range: list[float] = field(default_factory=lambda: [0.5, 1.0])
    k_soft: int = 3
    d2f_block_size: int = 16
    d2f_mask_range: list[float] = field(default_factory=lambda: [0.2, 0.7])
    seed: int = 42
    save_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    skip_invalid: bool = False
    device: str = "auto"
    fsdp: bool = False  # shard weights, gradients and moments over the processes (FSDP2)
    activation_checkpointing: bool | None = None  # None: on where memory needs it (memory.checkpointing_default)
    pg_timeout: float = 30.0  # minutes a collective waits for the slowest process before the job fails

    def validate(self) -> None:
        self._check_types()
        checks = [
            (self.objective in OBJECTIVES, "--objective", f"unknown objective {self.objective!r}",
             f"use one of {', '.join(OBJECTIVES)}"),
            (0 < self.lr < math.inf, "--lr", f"learning rate must be > 0 and finite, got {self.lr}", "e.g. --lr 1e-5"),
            (self.batch_size >= 1, "--batch-size", f"batch size must be >= 1, got {self.batch_size}", "e.g. 2"),
            (self.grad_accum >= 1, "--grad-accum", f"must be >= 1, got {self.grad_accum}", "e.g. 4"),
            (self.lora_r >= 1, "--lora-r", f"LoRA rank must be >= 1, got {self.lora_r}", "e.g. 128"),
            (self.lora_alpha > 0, "--lora-alpha", f"must be > 0, got {self.lora_alpha}", "e.g. 256"),
            (bool(self.lora_targets), "--lora-targets", "no module names given", "e.g. q_proj,k_proj,v_proj"),
            (0 <= self.lora_dropout < 1, "--lora-dropout", f"must be in [0, 1), got {self.lora_dropout}", "e.g. 0.05"),
            (self.epochs > 0 or self.max_steps, "--epochs", "nothing to train", "set --epochs or --max-steps"),
            (math.isfinite(self.epochs), "--epochs", f"must be finite, got {self.epochs}", "e.g. 3"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps", "must be >= 1", "e.g. 1000"),
            (self.weight_decay >= 0, "--weight-decay", f"must be >= 0, got {self.weight_decay}", "e.g. 0.1"),
            (self.warmup >= 0, "--warmup", f"must be >= 0, got {self.warmup}", "e.g. 100"),
            (self.min_response >= 0, "--min-response", f"must be >= 0, got {self.min_response}", "e.g. 32"),
            (self.response_length is None or self.response_length >= 1, "--response-length", "must be >= 1",
             "e.g. 256"),
            (self.trajectory_steps >= 1, "--trajectory-steps", "must be >= 1", "e.g. 4"),
            (self.k_soft >= 1, "--k-soft", "must be >= 1", "e.g. 3"),
            (bool(self.decode_counts) and all(c >= 1 for c in self.decode_counts), "--decode-counts",
             f"counts must be >= 1, got {self.decode_counts}", "e.g. 1,2,4,8"),
            (bool(self.block_sizes) and all(b >= 1 for b in self.block_sizes), "--block-sizes",
             f"sizes must be >= 1, got {self.block_sizes}", "e.g. 512"),
            (len(self.alpha_range) == 2 and 0 <= self.alpha_range[0] <= self.alpha_range[1] <= 1,
             "--alpha-range", f"need two values 0 <= lo <= hi <= 1, got {self.alpha_range}", "e.g. 0.5,1.0"),
            (self.d2f_block_size >= 1, "d2f_block_size", "must be >= 1", "e.g. 16"),
            (len(self.d2f_mask_range) == 2 and 0 <= self.d2f_mask_range[0] <= self.d2f_mask_range[1] <= 1,
             "d2f_mask_range", f"need two values 0 <= lo <= hi <= 1, got {self.d2f_mask_range}", "e.g. 0.2,0.7"),
            (self.save_every >= 1, "--save-every", "must be >= 1", "e.g. 500"),
            (self.keep_checkpoints >= 0, "--keep-checkpoints", "must be >= 0 (0 keeps all)", "e.g. 3"),
            (self.log_every >= 1, "log_every", "must be >= 1", "e.g. 10"),
            (self.max_grad_norm > 0, "max_grad_norm", "must be > 0", "e.g. 1.0"),
            (self.max_length >= 8, "--max-length", "must be >= 8", "e.g. 1024"),
            (0 < self.pg_timeout < math.inf, "--pg-timeout", f"must be > 0 minutes and finite, got {self.pg_timeout}",
             "e.g. 30"),
            (not (self.objective == "d2f" and self.full), "--full",
             "d2f distils the model without its adapter into the adapter, so it needs LoRA", "drop --full"),
        ]
        for ok, where, what, fix in checks:
            if not ok:
                raise ConfigError(what, where=where, fix=fix)

    def _check_types(self) -> None:
        """A value of the wrong type (from a YAML config) is one line, not a TypeError further on."""
        hints = get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if not _has_type(value, hints[f.name]):
                flag = f.name if f.name in YAML_ONLY else "--" + f.name.replace("_", "-")
                raise ConfigError(f"expected {_type_name(hints[f.name])}, got {value!r}", where=flag,
                                  fix="check the flag or the --config value")


YAML_ONLY = {"d2f_block_size", "d2f_mask_range", "log_every", "max_grad_norm", "data", "model", "out"}


def _has_type(value: Any, hint: Any) -> bool:
    origin, args = get_origin(hint), get_args(hint)
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if args:  # a union, e.g. int | None
        return any(_has_type(value, a) for a in args)
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)


OBJECTIVES = ("cts", "sft", "d2f")


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup to the peak (reached at the end of step `warmup`), then linear decay to 0."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


# A full fine-tune trained on a GPU is written as the official checkpoints are: bf16 (what inference uses;
# 16 GB at 8B instead of 32), in safetensors shards of at most 5 GB with an index.
EXPORT_DTYPE = torch.bfloat16
EXPORT_SHARD_BYTES = 5 * 10**9


def _on_cuda(device: str) -> bool:
    """Whether a --device value (after the per-process mapping) means a GPU."""
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


class StopRequested(Exception):
    """A signal stopped training after a checkpoint; the exit code tells the caller which one."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.exit_code = 128 + int(getattr(signal.Signals, signal_name, signal.SIGTERM))


class Trainer:
    def __init__(self, cfg: TrainConfig, *, log: Callable[[str], None] = print):
        cfg.validate()
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out).expanduser()
        self.stop_signal: str | None = None
        self.run: dict[str, Any] | None = None  # the run's identity, once `preflight` has checked the folder
        self.checked_for_resume: bool | None = None

    def preflight(self, resume: bool = False) -> None:
        """Before the model loads: the data file can be read, --out can be written and holds no other
        run (or, with `resume`, the same run, unfinished)."""
        input_file(self.cfg.data, what="training data", fix="pass a JSONL file")
        output_dir(self.out, "--out")
        self.run = runs.identity(self.cfg)
        runs.check_out(self.out, self.run, resume=resume)
        self.checked_for_resume = resume

    # -- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        from evotok_cli.runtime import distributed
        from evotok_cli.runtime.model import load_model

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        # the process's own device first, made current before the process group or any CUDA allocation
        self.group = distributed.from_environment(device=cfg.device, timeout=distributed.timeout_from(cfg.pg_timeout))
        if not self.group.is_main:
            self.log = lambda message: None
        device = self.group.device(cfg.device)
        gpu = _on_cuda(device)
        self.checkpointing = self._plan_memory(device) if gpu else bool(cfg.activation_checkpointing)
        # LoRA on a GPU: the frozen base in bf16 (an 8B model's fp32 copy alone would need 32 GB), the
        # adapter in fp32 (peft's default); full fine-tuning and the CPU keep fp32 weights
        frozen_bf16 = not cfg.full and gpu
        self.lm = load_model(cfg.model, adapter=cfg.adapter, device=device,
                             dtype="bfloat16" if frozen_bf16 else "float32")
        self.device = self.lm.device
        if self.lm.shifted_logits:
            raise ConfigError(f"finetune does not support {self.lm.family.name} models yet: their logits are shifted "
                              "by one position and the objectives assume unshifted ones", where=cfg.model,
                              fix="fine-tune a LLaDA-family checkpoint")
        net = self.lm.net
        net.requires_grad_(cfg.full)
        net.activation_checkpointing = self.checkpointing
        self.log(f"activation checkpointing: {'on' if self.checkpointing else 'off'}")
        self.base_net = net
        if not cfg.full:
            from peft import LoraConfig, get_peft_model

            names = {n.rsplit(".", 1)[-1] for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)}
            unknown = [t for t in cfg.lora_targets if t not in names]
            if unknown:
                raise ConfigError(f"LoRA target {unknown[0]!r} is not a linear layer of this model",
                                  where="--lora-targets", fix=f"choose from {', '.join(sorted(names))}")
            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=list(cfg.lora_targets), bias="none")
            net = get_peft_model(net, lora)
        self.net = net
        self.sharded = False
        if self.fsdp_requested:
            if self.group.world > 1:
                self._shard()
            else:
                self.log("fsdp: one process holds the whole model; nothing to shard")
        self.params = {n: p for n, p in net.named_parameters() if p.requires_grad}
        self.param_names = list(self.params)
        self.examples, self.stats = load_examples(
            cfg.data, self.lm.tokenizer, eot_id=self.lm.eot_id, max_length=cfg.max_length,
            min_response=cfg.min_response, skip_invalid=cfg.skip_invalid)
        self.log(f"data: {self.stats.summary()}")
        micro_per_epoch = math.ceil(len(self.examples) / self.global_batch)
        self.micro_per_epoch = micro_per_epoch
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum))
        decay, no_decay = [], []
        for _n, p in self.params.items():
            (no_decay if p.ndim < 2 else decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
        # param order inside the optimiser (decay group first) defines the checkpoint's moment names
        order = {id(p): n for n, p in self.params.items()}
        self.opt_names = [order[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.warmup, self.total_steps))
        self.noise = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.py_random = random.Random(cfg.seed)
        self.step = 0
        self.micro = 0  # micro-batches consumed since the start of training
        self.history: list[dict[str, Any]] = []

    @property
    def fsdp_requested(self) -> bool:
        return self.cfg.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")

    @property
    def shards(self) -> int:
        """Over how many processes FSDP will shard the weights (1: every process holds them all)."""
        return self.group.world if self.fsdp_requested else 1

    def _plan_memory(self, device: str) -> bool:
        """On a GPU, before the weights load: refuse a --full run whose training state cannot fit, and
        decide activation checkpointing (the flag, or the rule in `memory.checkpointing_default`)."""
        from evotok_cli.runtime.device import resolve_device
        from evotok_cli.training import memory

        cfg = self.cfg
        gpu = resolve_device(device)
        gpu = gpu if gpu.index is not None else torch.device("cuda", torch.cuda.current_device())
        size = memory.model_size(cfg.model) if cfg.full or cfg.activation_checkpointing is None else None
        free, total = memory.gpu_memory(gpu)
        if cfg.full:
            memory.check_full(size.params, free, shards=self.shards, device=str(gpu))
        if cfg.activation_checkpointing is not None:
            return cfg.activation_checkpointing
        return memory.checkpointing_default(cuda=True, full=cfg.full, size=size,
                                            tokens=cfg.batch_size * cfg.max_length, total=total)

    def _shard(self) -> None:
        """FSDP2: each transformer block is one unit, gathered for its forward and backward. On a GPU the
        gathered weights are bf16 (half the traffic and memory of fp32) while the shards the optimiser
        updates stay fp32, and gradients are reduced in fp32 so that summing over processes loses nothing."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        options = {}
        if self.device.type == "cuda":
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for unit in self.base_net.shard_units():
            fully_shard(unit, **options)
        fully_shard(self.base_net, **options)
        self.sharded = True

    @property
    def grad_scale(self) -> float:
        """What each backward is multiplied by. Every process's loss is already its share of the global
        mean, so gradients must be summed over processes; FSDP averages them (a sum needs a reduce op
        gloo lacks), hence the factor of the world size when sharded."""
        return (self.group.world if self.sharded else 1) / self.cfg.grad_accum

    def _gathered(self, state: dict[str, Any], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Sharded tensors gathered one at a time, kept (on the CPU, in `dtype`) by process 0 only: no
        process ever holds more than one full tensor on its GPU (a collective: every process calls it)."""
        out = {}
        for key, value in state.items():
            full = value.full_tensor() if hasattr(value, "full_tensor") else value
            if self.group.is_main:
                out[key] = full.detach().to("cpu", dtype=dtype or full.dtype)
            del full
        return out

    @property
    def global_batch(self) -> int:
        """Sequences per micro-batch over all processes (each process computes batch_size of them)."""
        return self.cfg.batch_size * self.group.world

    @property
    def rows(self) -> slice:
        return slice(self.group.rank * self.cfg.batch_size, (self.group.rank + 1) * self.cfg.batch_size)

    def objective(self) -> Callable[[Batch], tuple[torch.Tensor, list[float]]]:
        """A function batch -> (loss already backpropagated per pass, per-pass losses). Every process
        draws the noise of the global batch; each computes its own rows (see the objectives)."""
        cfg, lm, rows = self.cfg, self.lm, self.rows
        if cfg.objective == "sft":
            from evotok_cli.training.objectives import sft_loss

            def run(batch: Batch):
                loss, parts = sft_loss(self.net, batch, mask_id=lm.mask_id, generator=self.noise, rows=rows)
                (loss * self.grad_scale).backward()
                return loss.detach(), parts
            return run
        if cfg.objective == "cts":
            from evotok_cli.training.cts import CTSSettings, cts_step
            settings = CTSSettings(trajectory_steps=cfg.trajectory_steps, decode_counts=list(cfg.decode_counts),
                                   block_sizes=list(cfg.block_sizes), alpha_range=tuple(cfg.alpha_range),
                                   k_soft=cfg.k_soft)

            def run(batch: Batch):
                return cts_step(self.net, lm, batch, settings, rng=self.py_random, scale=self.grad_scale,
                                rows=rows)
            return run
        from evotok_cli.training.d2f import D2FSettings, d2f_step
        settings = D2FSettings(block_size=cfg.d2f_block_size, mask_range=tuple(cfg.d2f_mask_range))

        def run(batch: Batch):
            return d2f_step(self.net, lm, batch, settings, generator=self.noise, scale=self.grad_scale,
                            rows=rows)
        return run

    # -- data order ------------------------------------------------------------------------------
    def micro_batch(self, index: int) -> list[Example]:
        """The global micro-batch `index`: a slice of the epoch's seeded permutation. The last one of an
        epoch is filled up from the permutation's start, so every process always gets `batch_size` rows."""
        epoch, within = divmod(index, self.micro_per_epoch)
        perm = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        picked = perm[within * self.global_batch:(within + 1) * self.global_batch].tolist()
        if len(picked) < self.global_batch and self.group.world > 1:
            picked += perm[: self.global_batch - len(picked)].tolist()
        return [self.examples[i] for i in picked]

    # -- checkpoints -----------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def save(self) -> Path | None:
        """Rank 0 writes, the others wait for it; sharded, every process writes its own shards."""
        if self.sharded:
            return self._save_shards()
        if not self.group.is_main:
            self.group.barrier()
            return None
        path = checkpointing.save_checkpoint(
            self.checkpoint_dir, step=self.step, model_state={n: p.detach() for n, p in self.params.items()},
            optimizer_state=self.optimizer.state_dict(), param_names=self.opt_names,
            scheduler_state=self.scheduler.state_dict(), generators={"noise": self.noise},
            py_random=self.py_random, extra=self._checkpoint_extra(), keep=self.cfg.keep_checkpoints)
        self.group.barrier()
        return path

    def _checkpoint_extra(self) -> dict[str, Any]:
        return {"micro": self.micro, "history_tail": self.history[-200:], "config": asdict(self.cfg),
                "total_steps": self.total_steps, "run": self.run}

    def _save_shards(self) -> Path | None:
        """FSDP: each process writes the shards it holds (weights and moments, never gathered) into the
        checkpoint's temporary folder; rank 0 then adds the rest and renames it into place."""
        group, step = self.group, self.step
        if group.is_main:
            checkpointing.start_checkpoint(self.checkpoint_dir, step)
        group.barrier()
        tmp = checkpointing.temporary(self.checkpoint_dir, step)
        moments = self.optimizer.state_dict()
        checkpointing.write_tensors(tmp, {n: p.detach() for n, p in self.params.items()}, moments,
                                    self.opt_names, shard=(group.rank, group.world))
        group.barrier()
        path = None
        if group.is_main:
            path = checkpointing.finish_checkpoint(
                self.checkpoint_dir, tmp, step=step, param_groups=moments["param_groups"],
                scheduler_state=self.scheduler.state_dict(), generators={"noise": self.noise},
                py_random=self.py_random, extra={**self._checkpoint_extra(), "shards": group.world},
                keep=self.cfg.keep_checkpoints)
        group.barrier()
        return path

    def resume(self) -> bool:
        found = checkpointing.list_checkpoints(self.checkpoint_dir)
        if not found:
            self.log(f"--resume: no checkpoint in {self.checkpoint_dir}, starting from step 0")
            return False
        shard = (self.group.rank, self.group.world) if self.sharded else None
        meta = checkpointing.load_checkpoint(found[-1], model_params=self.params, optimizer=self.optimizer,
                                             param_names=self.opt_names, generators={"noise": self.noise},
                                             py_random=self.py_random, shard=shard)
        self.scheduler.load_state_dict(meta["scheduler"])
        self.step, self.micro = meta["step"], meta["micro"]
        self.history = self._read_log()
        self.log(f"resumed from {found[-1].name} (step {self.step} of {self.total_steps})")
        return True

    def _read_log(self) -> list[dict[str, Any]]:
        """The logged steps up to the checkpoint's. A line torn by a crash mid-append (or otherwise
        unreadable) is dropped with a note: the log is rewritten from what is kept."""
        path = self.out / "loss_log.jsonl"
        if not path.is_file():
            return []
        kept, dropped = [], 0
        for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                dropped += 1
            elif rec["step"] <= self.step:
                kept.append(rec)
        if dropped:
            self.log(f"loss_log.jsonl: dropped {dropped} unreadable line(s) (torn by an interruption?)")
        return kept

    # -- the loop --------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signal.Signals(signum).name

    def train(self, *, resume: bool = False, progress: Any = None) -> dict[str, Any]:
        cfg = self.cfg
        main = self.group.is_main
        if self.checked_for_resume is not resume:
            self.preflight(resume)
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.group.barrier()
        if resume:
            self.resume()
        if main:
            self._rewrite_log()
            atomic_write_text(self.out / "training_args.json", json.dumps(
                {**asdict(cfg), "total_steps": self.total_steps, "processes": self.group.world,
                 "data_stats": self.stats.summary(), "run": self.run}, indent=2))
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.net.train()
        objective = self.objective()
        t_start, tokens = time.perf_counter(), 0
        try:
            while self.step < self.total_steps:
                parts_sum: list[float] = []
                loss_sum = 0.0
                for _ in range(cfg.grad_accum):
                    examples = self.micro_batch(self.micro)
                    batch = collate(examples, pad_id=self.lm.eos_id, response_length=cfg.response_length,
                                    extra_pad=(0.5, 10) if cfg.objective == "cts" else None,
                                    rng=self.py_random).to(self.device)
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                        loss, parts = objective(batch)
                    loss_sum += float(loss)
                    parts_sum = [a + b for a, b in zip(parts_sum, parts)] if parts_sum else list(parts)
                    tokens += int(batch.ids.numel())
                    self.micro += 1
                loss_sum, parts_sum = self._sync(loss_sum, parts_sum)
                grad_norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm)
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                record = {"step": self.step, "loss": loss_sum / cfg.grad_accum,
                          "pass_losses": [p / cfg.grad_accum for p in parts_sum],
                          "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                          "tokens_per_s": tokens / max(time.perf_counter() - t_start, 1e-9)}
                self.history.append(record)
                if main:
                    with (self.out / "loss_log.jsonl").open("a", encoding="utf-8") as f:
                        f.write(json.dumps(record) + "\n")
                if progress is not None and main:
                    progress(self.step, self.total_steps, record)
                saved = self.step % cfg.save_every == 0 or self.step == self.total_steps
                path = self.save() if saved else None
                if self._stop_requested():
                    path = path if saved else self.save()
                    self.log(f"{self.stop_signal}: saved {path}; continue with --resume")
                    raise StopRequested(self.stop_signal or "SIGTERM")
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        self.net.eval()
        summary = self.export()
        self.group.barrier()
        self.group.close()
        return summary

    def _sync(self, loss: float, parts: list[float]) -> tuple[float, list[float]]:
        """Data parallel: sum the processes' gradients and loss shares (each is its share of the
        global mean, so the sum is exactly what one process with the global batch computes)."""
        if self.group.world == 1:
            return loss, parts
        import torch.distributed as dist
        if not self.sharded:  # FSDP has reduce-scattered the gradients already
            for p in self.params.values():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
        totals = torch.tensor([loss, *parts], dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)
        return float(totals[0]), totals[1:].tolist()

    def _stop_requested(self) -> bool:
        """A signal seen by any process stops them all at the same step."""
        if self.group.world == 1:
            return self.stop_signal is not None
        import torch.distributed as dist
        flag = torch.tensor([1 if self.stop_signal else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.stop_signal:
            self.stop_signal = "SIGTERM"
        return bool(flag.item())

    def _rewrite_log(self) -> None:
        atomic_write_text(self.out / "loss_log.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))

    # -- output ----------------------------------------------------------------------------------
    def _export_dtype(self) -> torch.dtype | None:
        """bf16 for a model trained on a GPU (see EXPORT_DTYPE); the CPU's fp32 as it is."""
        return EXPORT_DTYPE if self.device.type == "cuda" else None

    def export(self) -> dict[str, Any]:
        """Every process gathers the weights; rank 0 writes them and returns the summary."""
        from evotok_cli.runtime.writer import copy_tokenizer, save_model

        cfg = self.cfg
        if cfg.full:
            dtype = self._export_dtype()
            state = self._gathered(self.base_net.state_dict(), dtype)
        else:
            from peft import get_peft_model_state_dict
            state = self._gathered(get_peft_model_state_dict(self.net, save_embedding_layers=False))
        if not self.group.is_main:
            return {}
        if cfg.full:
            total = sum(t.numel() * t.element_size() for t in state.values())
            save_model(None, self.lm.config.to_hf(), self.out, state=state, dtype=dtype,
                       shard_bytes=EXPORT_SHARD_BYTES if total > EXPORT_SHARD_BYTES else None)
            copy_tokenizer(self.lm.path, self.out)
            kind = "model"
        else:
            from evotok_cli.runtime.checkpoint import save_safetensors
            peft_cfg = self.net.peft_config["default"]
            peft_cfg.base_model_name_or_path = str(self.lm.path)
            save_safetensors(state, self.out / "adapter_model.safetensors")
            peft_cfg.save_pretrained(str(self.out))  # adapter_config.json
            kind = "adapter"
        plot = plot_losses(self.history, self.out / "loss.png")
        summary = {"schema": "evotok.finetune/1", "out": str(self.out), "kind": kind, "objective": cfg.objective,
                   "steps": self.step, "final_loss": self.history[-1]["loss"] if self.history else None,
                   "examples": self.stats.used, "skipped": dict(self.stats.skipped),
                   "loss_plot": str(plot) if plot else None}
        return summary


def plot_losses(history: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not history:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in history]
    passes = len(history[-1]["pass_losses"])
    if passes > 1:
        for j in range(passes):
            ax.plot(steps, [r["pass_losses"][j] if len(r["pass_losses"]) > j else float("nan") for r in history],
                    lw=0.8, label=f"pass {j + 1}")
    ax.plot(steps, [r["loss"] for r in history], lw=1.2, color="black", label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
