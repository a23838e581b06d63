"""`evotok finetune`: one training loop for every objective, LoRA (through peft) or full.

Order of a step: micro-batches in a fixed, seeded order (epoch permutation), one backward per objective
pass, gradient accumulation, clipping, AdamW, linear schedule with warmup. Checkpoints carry everything
needed to continue bit-for-bit; SIGINT/SIGTERM save one before exiting. `preflight` checks the data file
and the output folder before the model loads (see `runs`: one run per folder). The options are declared
in `config`; the loss log, the optimiser and the multi-process pieces live in `losslog`, `optim` and
`parallel`.

Three objects, one name each, here and in every training module: `model` is evotok's runtime
`DiffusionModel` (tokenizer, ids, config, device); `transformer` is the bare network inside it
(`model.net`: what FSDP shards and a --full run exports); `trainable` is the module the optimiser trains,
the transformer wrapped by peft for LoRA, or the transformer itself with --full. peft puts its layers
inside the transformer's modules, so a forward through either trains the adapter.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from evotok_cli.base import stopping
from evotok_cli.base.errors import ConfigError
from evotok_cli.base.files import atomic_write_text, input_file, output_dir
from evotok_cli.training import checkpointing, losslog, objective_step, optim, parallel, runs
from evotok_cli.training.config import OBJECTIVES, TrainConfig
from evotok_cli.training.data import Example, load_examples
from evotok_cli.training.export import EXPORT_DTYPE, EXPORT_SHARD_BYTES
from evotok_cli.training.objectives import Batch, collate

__all__ = ["EXPORT_DTYPE", "EXPORT_SHARD_BYTES", "OBJECTIVES", "StopRequested", "TrainConfig", "Trainer"]


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
        self.resume_changes: dict[str, list[Any]] = {}  # safe settings a resume changed (runs.SAFE_ON_RESUME)
        self.checked_for_resume: bool | None = None

    def preflight(self, resume: bool = False) -> None:
        """Before the model loads: the data file can be read, --out can be written and holds no other
        run (or, with `resume`, the same run, unfinished). Only rank 0 of a multi-process run hashes and
        compares: it alone writes the record, and the launcher stops the others when it refuses."""
        input_file(self.cfg.data, what="training data", fix="pass a JSONL file")
        output_dir(self.out, "--out")
        if os.environ.get("RANK", "0") in ("", "0"):
            self.run, self.resume_changes = runs.check_out(self.out, self.cfg, resume=resume)
        self.checked_for_resume = resume

    # -- setup -----------------------------------------------------------------------------------
    def _check_cts_window(self) -> None:
        """Warn when CTS blocks would not fit the response window (the shortest response without
        --response-length): see `cts.prompt_overlap_warning`."""
        from evotok_cli.training.cts import prompt_overlap_warning

        cfg = self.cfg
        if cfg.objective != "cts" or not self.examples:
            return
        window = cfg.response_length or min(len(e.response_ids) for e in self.examples)
        warning = prompt_overlap_warning(cfg.trajectory_steps, cfg.decode_counts, window)
        if warning:
            self.log(f"warning: {warning}")

    def setup(self) -> None:
        """Process group, model (with LoRA, sharded), data, optimiser and random generators, in this order."""
        from evotok_cli.runtime import distributed

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        # the process's own device first, made current before the process group or any CUDA allocation
        self.group = distributed.from_environment(device=cfg.device, timeout=distributed.timeout_from(cfg.pg_timeout))
        if not self.group.is_main:
            self.log = lambda message: None
        self.trainable = self._load_model(self.group.device(cfg.device))
        self.sharded = False
        if self.fsdp_requested:
            if self.group.world > 1:
                self._shard()
            else:
                self.log("fsdp: one process holds the whole model; nothing to shard")
        self.params = {n: p for n, p in self.trainable.named_parameters() if p.requires_grad}
        self.param_names = list(self.params)
        self.examples, self.stats = load_examples(
            cfg.data, self.model.tokenizer, eot_id=self.model.eot_id, max_length=cfg.max_length,
            min_response=cfg.min_response, skip_invalid=cfg.skip_invalid)
        self.log(f"data: {self.stats.summary()}")
        self._check_cts_window()
        self.micro_per_epoch = math.ceil(len(self.examples) / self.global_batch)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.micro_per_epoch / cfg.grad_accum))
        self.optimizer, self.opt_names, self.scheduler = optim.build(
            self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup, total_steps=self.total_steps)
        self.noise = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.py_random = random.Random(cfg.seed)
        self.step = 0
        self.micro = 0  # micro-batches consumed since the start of training
        self.history: list[dict[str, Any]] = []

    def _load_model(self, device: str) -> torch.nn.Module:
        """The trainable module (the transformer, wrapped in LoRA unless --full), after the memory plan."""
        from evotok_cli.runtime.model import load_model

        cfg = self.cfg
        gpu = _on_cuda(device)
        if gpu:  # refuse a --full run that cannot fit before the weights load; decide checkpointing
            from evotok_cli.training import memory
            self.checkpointing = memory.plan(cfg, device, shards=self.shards)
        else:
            self.checkpointing = bool(cfg.activation_checkpointing)
        # LoRA on a GPU: the frozen base in bf16 (an 8B model's fp32 copy alone would need 32 GB), the
        # adapter in fp32 (peft's default); full fine-tuning and the CPU keep fp32 weights
        frozen_bf16 = not cfg.full and gpu
        # --quantize (QLoRA): the frozen base's block linears in int8/int4 (runtime/quantize.py), LoRA beside them
        self.model = load_model(cfg.model, adapter=cfg.adapter, device=device,
                                dtype="bfloat16" if frozen_bf16 else "float32", quantize=cfg.quantize)
        self.device = self.model.device
        transformer = self.transformer = self.model.net
        if cfg.quantize != "none":
            from evotok_cli.runtime.quantize import quantized_names
            count = len(quantized_names(transformer))
            self.log(f"QLoRA: the frozen base's {count} block linear layers in {cfg.quantize}")
        if self.model.shifted_logits:
            raise ConfigError(f"finetune does not support {self.model.family.name} models yet: their logits are "
                              "shifted by one position and the objectives assume unshifted ones", where=cfg.model,
                              fix="fine-tune a LLaDA-family checkpoint")
        transformer.requires_grad_(cfg.full)
        transformer.activation_checkpointing = self.checkpointing
        self.log(f"activation checkpointing: {'on' if self.checkpointing else 'off'}")
        return transformer if cfg.full else self._with_lora(transformer)

    def _with_lora(self, transformer: torch.nn.Module) -> torch.nn.Module:
        """`transformer` wrapped by peft with --lora-targets, each of which must name a linear layer."""
        from peft import LoraConfig, get_peft_model

        cfg = self.cfg
        names = {n.rsplit(".", 1)[-1] for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
        unknown = [t for t in cfg.lora_targets if t not in names]
        if unknown:
            raise ConfigError(f"LoRA target {unknown[0]!r} is not a linear layer of this model",
                              where="--lora-targets", fix=f"choose from {', '.join(sorted(names))}")
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_targets), bias="none")
        return get_peft_model(transformer, lora)

    @property
    def fsdp_requested(self) -> bool:
        return self.cfg.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")

    @property
    def shards(self) -> int:
        """Over how many processes FSDP will shard the weights (1: every process holds them all)."""
        return self.group.world if self.fsdp_requested else 1

    def _shard(self) -> None:
        parallel.shard(self.transformer, self.device)
        self.sharded = True

    @property
    def grad_scale(self) -> float:
        """What each backward is multiplied by. Every process's loss is already its share of the global
        mean, so gradients must be summed over processes; FSDP averages them (a sum needs a reduce op
        gloo lacks), hence the factor of the world size when sharded."""
        return (self.group.world if self.sharded else 1) / self.cfg.grad_accum

    @property
    def global_batch(self) -> int:
        """Sequences per micro-batch over all processes (each process computes batch_size of them)."""
        return self.cfg.batch_size * self.group.world

    @property
    def rows(self) -> slice:
        return slice(self.group.rank * self.cfg.batch_size, (self.group.rank + 1) * self.cfg.batch_size)

    def objective(self) -> Callable[[Batch], tuple[torch.Tensor, list[float]]]:
        """A function batch -> (loss already backpropagated per pass, per-pass losses): see the objectives."""
        return objective_step.step_function(self.cfg, self.trainable, self.model, rows=self.rows, scale=self.grad_scale,
                                            noise=self.noise, rng=self.py_random)

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
        self.history = losslog.read(self.out, self.step, self.log)
        self.log(f"resumed from {found[-1].name} (step {self.step} of {self.total_steps})")
        return True

    # -- the loop --------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signal.Signals(signum).name

    def train(self, *, resume: bool = False, progress: Any = None) -> dict[str, Any]:
        """Train to `total_steps` (from the last checkpoint with `resume`), then export; the summary, or
        {} on the processes other than rank 0. A signal ends it with StopRequested after a checkpoint."""
        self._begin(resume)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.stop_signal = self.stop_signal or stopping.pending()  # one that came during set-up and was swallowed
        self.trainable.train()
        objective = self.objective()
        clock = {"start": time.perf_counter(), "tokens": 0}
        try:
            while self.step < self.total_steps:
                record = self._step(objective, clock)
                if progress is not None and self.group.is_main:
                    progress(self.step, self.total_steps, record)
                saved = self.step % self.cfg.save_every == 0 or self.step == self.total_steps
                path = self.save() if saved else None
                if self._stop_requested():
                    path = path if saved else self.save()
                    self.log(f"{self.stop_signal}: saved {path}; continue with --resume")
                    raise StopRequested(self.stop_signal or "SIGTERM")
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        self.trainable.eval()
        summary = self.export()
        self.group.barrier()
        self.group.close()
        return summary

    def _begin(self, resume: bool) -> None:
        """The folder checked and made, the checkpoint loaded, the log and training_args.json written."""
        main = self.group.is_main
        if self.checked_for_resume is not resume:
            self.preflight(resume)
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.group.barrier()
        earlier = runs.read_args(self.out).get("history") if resume and main else None
        history = list(earlier) if isinstance(earlier, list) else []  # what earlier resumes changed
        if resume and self.resume() and self.resume_changes:
            history.append(runs.history_entry(self.step, self.resume_changes))
            self.log("--resume: changed " + ", ".join(f"{runs.flag_of(k)} {then} -> {now}"
                                                      for k, (then, now) in self.resume_changes.items()))
        if main:
            losslog.rewrite(self.out, self.history)
            atomic_write_text(self.out / "training_args.json", json.dumps(
                {**asdict(self.cfg), "total_steps": self.total_steps, "processes": self.group.world,
                 "data_stats": self.stats.summary(), "run": self.run, "history": history}, indent=2))

    def _step(self, objective: Callable[[Batch], tuple[torch.Tensor, list[float]]],
              clock: dict[str, Any]) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches; its loss log record, appended by rank 0."""
        cfg = self.cfg
        parts_sum: list[float] = []
        loss_sum = 0.0
        for _ in range(cfg.grad_accum):
            examples = self.micro_batch(self.micro)
            batch = collate(examples, pad_id=self.model.eos_id, response_length=cfg.response_length,
                            extra_pad=(0.5, 10) if cfg.objective == "cts" else None,
                            rng=self.py_random).to(self.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                loss, parts = objective(batch)
            loss_sum += float(loss)
            parts_sum = [a + b for a, b in zip(parts_sum, parts)] if parts_sum else list(parts)
            clock["tokens"] += int(batch.ids.numel())
            self.micro += 1
        loss_sum, parts_sum = parallel.sync(self.group, self.params, sharded=self.sharded, loss=loss_sum,
                                            parts=parts_sum, device=self.device)
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        record = {"step": self.step, "loss": loss_sum / cfg.grad_accum,
                  "pass_losses": [p / cfg.grad_accum for p in parts_sum],
                  "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                  "tokens_per_s": clock["tokens"] / max(time.perf_counter() - clock["start"], 1e-9)}
        self.history.append(record)
        if self.group.is_main:
            losslog.append(self.out, record)
        return record

    def _stop_requested(self) -> bool:
        """A signal seen by any process stops them all at the same step."""
        stop = parallel.any_stopped(self.group, self.stop_signal is not None, self.device)
        if stop and not self.stop_signal:
            self.stop_signal = "SIGTERM"
        return stop

    # -- output ----------------------------------------------------------------------------------
    def _export_dtype(self) -> torch.dtype | None:
        """bf16 for a model trained on a GPU (see EXPORT_DTYPE); the CPU's fp32 as it is."""
        return EXPORT_DTYPE if self.device.type == "cuda" else None

    def export(self) -> dict[str, Any]:
        """Every process gathers the weights; rank 0 writes them and returns the summary (`export.py`)."""
        from evotok_cli.training.export import export_run

        return export_run(self)
