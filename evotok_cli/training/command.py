"""What `evotok finetune` does with its flags: merge them over the --config file and TrainConfig's declared
defaults (flag > EVOTOK_* variable > YAML > default), train with a progress bar, and report."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from evotok_cli.base.errors import EvotokError
from evotok_cli.base.options import merged, yaml_defaults
from evotok_cli.training.config import TrainConfig

COMMAND_ONLY = {"json": False}  # --config keys that are the command's, not the run's


def train_config(data: Path, flags: dict[str, Any], config: Path | None) -> tuple[TrainConfig, Any]:
    """The run's TrainConfig (not yet validated: the Trainer does it) and the merged settings."""
    from evotok_cli.jobs.config import Settings, model_folder

    defaults, kinds = yaml_defaults(TrainConfig)
    settings = Settings({**defaults, **COMMAND_ONLY}, config, command="finetune", types=kinds)
    if settings.decoder_options:
        raise EvotokError("`decoder:` has no meaning for finetune", where=str(config), fix="remove that section")
    if settings.get("out", flags.get("out")) is None:
        raise EvotokError("no output folder", where="evotok finetune", fix="pass --out DIR")
    values = merged(TrainConfig, settings, flags)
    values.update(model=str(model_folder(values["model"])), out=str(values["out"]))
    return TrainConfig(data=str(data), **values), settings


def run(data: Path, flags: dict[str, Any], *, resume: bool, config: Path | None, as_json: bool | None) -> None:
    """Train; print the summary (JSON with --json) on rank 0. A signal exits 130 / 143 after a checkpoint.
    The --out folder is locked for the whole run: a second finetune into it is refused (`locks`)."""
    from evotok_cli.base.files import output_dir
    from evotok_cli.base.locks import hold_dir
    from evotok_cli.training import runs

    cfg, settings = train_config(data, flags, config)
    runs.check_inputs(Path(cfg.out).expanduser(), {"DATA": data, "--config": config})
    with hold_dir(output_dir(Path(cfg.out).expanduser(), "--out"), "--out"):
        _train(cfg, settings, resume=resume, as_json=as_json)


def _train(cfg: TrainConfig, settings: Any, *, resume: bool, as_json: bool | None) -> None:
    from evotok_cli.base.console import stderr
    from evotok_cli.base.threads import apply as apply_threads
    from evotok_cli.training.progress import TrainProgress
    from evotok_cli.training.trainer import StopRequested, Trainer

    err = stderr()
    cfg.threads = apply_threads(cfg.threads).threads  # before the model loads; training_args.json records it
    trainer = Trainer(cfg, log=lambda m: err.print(f"[dim]{m}[/dim]"))
    trainer.preflight(resume)  # data file, --out, one run per folder: before the model loads
    trainer.setup()
    # rank 0 alone draws progress under torchrun / accelerate (the other ranks' bars were empty duplicates)
    bar = TrainProgress(err, trainer.total_steps, cfg.log_every) if trainer.group.is_main else None
    try:
        with bar or nullcontext():
            summary = trainer.train(resume=resume, progress=bar.update if bar else None)
    except StopRequested as exc:  # typer.Exit would be swallowed (standalone_mode=False): exit 130 / 143
        raise SystemExit(exc.exit_code) from None
    if not summary:  # a non-main process of a data-parallel run: rank 0 reports
        return
    if settings.get("json", as_json):
        import typer
        typer.echo(json.dumps(summary, indent=2))
    else:
        err.print(f"wrote {summary['kind']} to {summary['out']} (step {summary['steps']}, "
                  f"final loss {summary['final_loss']:.4f})")
