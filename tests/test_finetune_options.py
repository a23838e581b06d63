"""`evotok finetune`'s options are TrainConfig's fields: every flag, its --help default, its --config key and
its range error come from one declaration, and flags beat variables beat the YAML file beat the default."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from evotok_cli.base.errors import ConfigError
from evotok_cli.base.options import check_bounds, option, shown, yaml_defaults
from evotok_cli.cli.app import app
from evotok_cli.training import command
from evotok_cli.training.config import TrainConfig

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _flags(argv: list[str], monkeypatch, env: dict[str, str] | None = None) -> dict:
    """What `evotok finetune ARGV` hands to the training (nothing is trained)."""
    seen = {}
    monkeypatch.setattr(command, "run", lambda data, flags, **kw: seen.update(flags, data=data, **kw))
    result = CliRunner().invoke(app, ["finetune", *argv], env=env or {}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return seen


def test_help_lists_every_declared_option_with_its_default():
    text = " ".join(CliRunner().invoke(app, ["finetune", "--help"], env={"COLUMNS": "200"}).output.split())
    for f in FIELDS.values():
        flag = "--" + f.name.replace("_", "-")
        if not f.metadata["cli"]:
            assert flag + " " not in text, flag  # YAML-only (d2f_block_size, log_every) or internal
            continue
        assert flag in text, flag
        if shown(f):
            assert f"{f.metadata['help']} [default: {shown(f)}]".strip() in text, flag
    assert "[default: 1e-5]" in text and "[default: 32 for cts" in text and "--full / --lora" in text
    options = text[text.index("Options:"):]
    assert options.index("--pg-timeout") < options.index("--resume") < options.index("--config") < options.index("--json")


def test_flags_arrive_unset_or_typed(monkeypatch, tmp_path):
    seen = _flags(["data.jsonl", "--lr", "0.5", "--lora", "--decode-counts", "1,2", "-m", "m", "--resume"],
                  monkeypatch, env={"EVOTOK_PG_TIMEOUT": "5"})
    assert seen["lr"] == 0.5 and seen["full"] is False and seen["decode_counts"] == "1,2" and seen["model"] == "m"
    assert seen["pg_timeout"] == 5.0 and seen["resume"] is True and str(seen["data"]) == "data.jsonl"
    unset = {n for n, f in FIELDS.items() if f.metadata["cli"]} - {"lr", "full", "decode_counts", "model",
                                                                   "pg_timeout"}
    assert all(seen[n] is None for n in unset)  # so that the YAML file and the default can fill them in
    assert set(seen) >= {n for n, f in FIELDS.items() if f.metadata["cli"]}


def test_flag_beats_yaml_beats_default(tmp_path):
    yaml = tmp_path / "c.yaml"
    yaml.write_text("objective: sft\nlr: 0.1\nbatch_size: 3\nblock_sizes: [256, 512]\nlora_alpha: 4\nlog_every: 2\n")
    cfg, settings = command.train_config(tmp_path / "d.jsonl", {"lr": 0.5, "out": tmp_path / "o"}, yaml)
    assert (cfg.lr, cfg.batch_size, cfg.block_sizes, cfg.log_every) == (0.5, 3, [256, 512], 2)
    assert cfg.lora_alpha == 4.0 and isinstance(cfg.lora_alpha, float)
    assert cfg.min_response == 1 and cfg.epochs == 1.0 and cfg.lora_targets == ["q_proj", "k_proj", "v_proj"]
    assert cfg.out == str(tmp_path / "o") and cfg.data == str(tmp_path / "d.jsonl") and cfg.model
    cfg.validate()


def test_min_response_follows_the_objective_unless_set(tmp_path):
    out = {"out": tmp_path / "o"}
    assert command.train_config(tmp_path / "d", out, None)[0].min_response == 32  # cts, the EvoToken recipe
    assert command.train_config(tmp_path / "d", {**out, "objective": "sft"}, None)[0].min_response == 1
    assert command.train_config(tmp_path / "d", {**out, "min_response": 0}, None)[0].min_response == 0


def test_yaml_keys_are_the_declared_options():
    defaults, kinds = yaml_defaults(TrainConfig)
    assert set(defaults) == set(FIELDS) - {"data", "max_grad_norm"}
    assert defaults["block_sizes"] == "512" and defaults["min_response"] is None and kinds["min_response"] is int
    lists = {"lora_targets", "decode_counts", "block_sizes", "alpha_range", "d2f_mask_range"}  # text or a YAML list
    assert kinds == {"model": str, "out": str, "adapter": str, "max_steps": int, "min_response": int,
                     "response_length": int, "threads": int, "activation_checkpointing": bool,
                     **dict.fromkeys(lists, list)}


@dataclass
class Toy:
    rate: float = option(0.5, min=0, min_open=True, finite=True, what="rate", unit="per second")
    share: float = option(0.1, min=0, max=1, max_open=True)
    sizes: list[int] = option([8], min=1, what="sizes")
    names: list[str] = option(["a"], what="names")
    span: list[float] = option([0.2, 0.7], min=0, max=1, pair=True, cli=False)
    kind: str = option("x", choices=("x", "y"), what="kind")


@pytest.mark.parametrize(("change", "line"), [
    ({"rate": 0.0}, "--rate: rate must be > 0 per second and finite, got 0.0 (e.g. 0.5)"),
    ({"rate": float("nan")}, "--rate: rate must be > 0 per second and finite, got nan (e.g. 0.5)"),
    ({"share": 1.0}, "--share: must be in [0, 1), got 1.0 (e.g. 0.1)"),
    ({"sizes": [4, 0]}, "--sizes: sizes must be >= 1, got [4, 0] (e.g. 8)"),
    ({"sizes": []}, "--sizes: sizes must be >= 1, got [] (e.g. 8)"),
    ({"names": []}, "--names: no names given (e.g. a)"),
    ({"span": [0.9, 0.1]}, "span: need two values 0 <= lo <= hi <= 1, got [0.9, 0.1] (e.g. 0.2,0.7)"),
    ({"kind": "z"}, "--kind: unknown kind 'z' (use one of x, y)"),
])
def test_declared_bounds_give_one_line_with_the_fix(change, line):
    check_bounds(Toy())
    with pytest.raises(ConfigError) as exc:
        check_bounds(Toy(**change))
    assert exc.value.line() == line
