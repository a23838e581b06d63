"""The end of a fine-tune: the trained weights written where inference reads them. A full fine-tune is
written as the official checkpoints are (on a GPU in bf16, what inference uses: 16 GB at 8B instead of 32,
in safetensors shards of at most 5 GB with an index); a LoRA run as a PEFT adapter folder whose config
appears whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from evotok_cli.training import losslog, parallel

EXPORT_DTYPE = torch.bfloat16
EXPORT_SHARD_BYTES = 5 * 10**9


def export_run(trainer: Any) -> dict[str, Any]:
    """Every process gathers the weights; rank 0 writes them and returns the summary."""
    from evotok_cli.runtime.writer import copy_tokenizer, save_model

    cfg = trainer.cfg
    if cfg.full:
        dtype = trainer._export_dtype()
        state = parallel.gathered(trainer.group, trainer.transformer.state_dict(), dtype)
    else:
        from peft import get_peft_model_state_dict
        state = parallel.gathered(trainer.group,
                                  get_peft_model_state_dict(trainer.trainable, save_embedding_layers=False))
    if not trainer.group.is_main:
        return {}
    if cfg.full:
        total = sum(t.numel() * t.element_size() for t in state.values())
        save_model(None, trainer.model.config.to_hf(), trainer.out, state=state, dtype=dtype,
                   shard_bytes=EXPORT_SHARD_BYTES if total > EXPORT_SHARD_BYTES else None)
        copy_tokenizer(trainer.model.path, trainer.out)
        kind = "model"
    else:
        from evotok_cli.runtime.checkpoint import save_safetensors
        peft_cfg = trainer.trainable.peft_config["default"]
        peft_cfg.base_model_name_or_path = str(trainer.model.path)
        save_safetensors(state, trainer.out / "adapter_model.safetensors")
        with tempfile.TemporaryDirectory(dir=trainer.out, prefix=".adapter-config-") as tmp:  # whole or not at all
            peft_cfg.save_pretrained(tmp)
            os.replace(Path(tmp) / "adapter_config.json", trainer.out / "adapter_config.json")
        kind = "adapter"
    plot = losslog.plot(trainer.history, trainer.out / "loss.png")
    return {"schema": "evotok.finetune/1", "out": str(trainer.out), "kind": kind, "objective": cfg.objective,
            "steps": trainer.step, "final_loss": trainer.history[-1]["loss"] if trainer.history else None,
            "examples": trainer.stats.used, "skipped": dict(trainer.stats.skipped),
            "loss_plot": str(plot) if plot else None}
