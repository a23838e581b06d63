"""Run under torchrun by tests/test_finetune_gpu.py: a fine-tune from a JSON TrainConfig that can stop
after a given step (as SIGTERM would) or resume. Not a test module itself."""

from __future__ import annotations

import json
import sys

from evotok_cli.training.trainer import StopRequested, TrainConfig, Trainer


def main() -> int:
    args = json.loads(sys.argv[1])
    stop_at, resume = args.pop("stop_at", None), args.pop("resume", False)
    trainer = Trainer(TrainConfig(**args), log=lambda message: None)
    trainer.preflight(resume)
    trainer.setup()

    def progress(step: int, total: int, record: dict) -> None:
        if step == stop_at:
            trainer.stop_signal = "SIGTERM"

    try:
        trainer.train(resume=resume, progress=progress)
    except StopRequested as exc:
        trainer.group.close()
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
