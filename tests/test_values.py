"""One options system (issue 29, item 3): command options and decoder options share one range checker and
one formatter (`evotok_cli.base.values.Bounds`), a value's declaration is apart from how the CLI shows it
(`options.Cli`), and the keywords plugins and commands used before `Cli` still work."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import pytest

from evotok_cli.base.errors import ConfigError
from evotok_cli.base.options import Cli, check_value, flag, like, shown, typer_parameters
from evotok_cli.base.options import option as command_option
from evotok_cli.base.values import Bounds, format_default
from evotok_cli.decoding.api import check_model_options, check_sampling, describe_options, option, parse_options


@pytest.mark.parametrize("bounds, inside, outside", [
    (Bounds(0, 1), [0, 0.5, 1], [-0.1, 1.1, math.nan]),
    (Bounds(0, 1, min_open=True), [1e-9, 1], [0, 2]),
    (Bounds(0, 1, max_open=True), [0, 0.999], [1]),
    (Bounds(min=1), [1, 10**9], [0]),
    (Bounds(max=5), [-3, 5], [6]),
    (Bounds(finite=True), [0, -1e300], [math.inf, math.nan]),
    (Bounds(min=1, max="vocab_size"), [1, 10**12], [0]),  # the model's bound is no bound before the model
])
def test_one_range_checker(bounds, inside, outside):
    assert all(bounds.contains(v) for v in inside)
    assert not any(bounds.contains(v) for v in outside)


@pytest.mark.parametrize("bounds, interval, phrase", [
    (Bounds(0, 1), "[0, 1]", "in [0, 1]"),
    (Bounds(0.0, 1.0, min_open=True), "(0.0, 1.0]", "in (0.0, 1.0]"),
    (Bounds(min=1), "[1, inf]", ">= 1"),
    (Bounds(min=0, min_open=True), "(0, inf]", "> 0"),
    (Bounds(max=2, max_open=True), "[-inf, 2)", "< 2"),
    (Bounds(), "", ""),
    (Bounds(min=1, max="vocab_size"), "[1, vocab_size]", "in [1, vocab_size]"),
])
def test_one_formatter(bounds, interval, phrase):
    assert (bounds.interval(), bounds.phrase()) == (interval, phrase)


def test_phrase_with_unit_and_finite():
    assert Bounds(min=1, max=8).phrase("minutes") == "in [1, 8] minutes"
    assert Bounds(min=0, finite=True).phrase() == ">= 0 and finite"


def test_model_bound_resolves_against_the_model():
    class Model:
        vocab_size = 100

    known = Bounds(min=1, max="vocab_size").resolved(Model())
    assert known.max == 100 and known.above(101) and not known.above(100)
    assert Bounds(min=1, max="vocab_size").resolved(object()).max is None


@pytest.mark.parametrize("default, text", [(None, None), (False, None), (True, "True"), (0.7, "0.7"),
                                           (1e-5, "1e-05"), ([1, 2], "1,2"), ("auto", "auto"), (3, "3")])
def test_default_formatter(default, text):
    assert format_default(default) == text


# -- declarations: the value apart from the command line ---------------------------------------------------
@dataclasses.dataclass
class Old:
    """Declared with the keywords from before `Cli`."""

    size: int = command_option(8, "rows", flags=("--size", "-s"), envvar="EVOTOK_SIZE", shown="eight", min=1,
                               cli_range=True)
    path: str | None = command_option(None, "a file", cli_type=str)
    hidden: int = command_option(3, cli=False, min=0)


@dataclasses.dataclass
class New:
    """The same options, declared with `Cli`."""

    size: int = command_option(8, "rows", min=1, cli=Cli(flags=("--size", "-s"), env="EVOTOK_SIZE", shown="eight",
                                                           checks_range=True))
    path: str | None = command_option(None, "a file", cli=Cli(type=str))
    hidden: int = command_option(3, min=0, cli=False)


def test_old_keywords_declare_what_cli_declares():
    old, new = dataclasses.fields(Old), dataclasses.fields(New)
    assert [dict(f.metadata) for f in old] == [dict(f.metadata) for f in new]
    size = old[0].metadata
    assert size["cli"] == Cli(flags=("--size", "-s"), env="EVOTOK_SIZE", shown="eight", checks_range=True)
    assert size["bounds"] == Bounds(min=1)
    assert old[2].metadata["cli"] is None  # no flag: the option is a --config key only
    assert [flag(f) for f in old] == ["--size", "--path", "hidden"]
    assert [shown(f) for f in old] == ["eight", None, "3"]


def test_an_unknown_keyword_is_refused():
    with pytest.raises(TypeError, match="flagz"):
        command_option(1, "x", flagz=("--x",))


def test_typer_parameters_come_from_cli():
    (size, path) = typer_parameters(Old)  # `hidden` has no flag
    assert size.name == "size" and size.default.param_decls == ("--size", "-s")
    assert size.default.envvar == "EVOTOK_SIZE" and (size.default.min, size.default.max) == (1, None)
    assert size.default.help == "rows [default: eight]"
    assert path.default.param_decls == ("--path",) and path.default.help == "a file"


def test_like_copies_the_declaration_with_changes():
    @dataclasses.dataclass
    class Other:
        size: int = like(Old, "size", help="other rows")
        hidden: int = like(Old, "hidden")

    size, hidden = dataclasses.fields(Other)
    assert size.metadata["help"] == "other rows"
    assert {**size.metadata, "help": "rows"} == dict(dataclasses.fields(Old)[0].metadata)
    assert dict(hidden.metadata) == dict(dataclasses.fields(Old)[2].metadata)


def test_command_range_error_uses_the_shared_formatter():
    f = dataclasses.fields(Old)[0]
    with pytest.raises(ConfigError) as caught:
        check_value(f, 0)
    assert caught.value.line() == "--size: must be >= 1, got 0 (e.g. eight)"


# -- decoder options: the same declaration, and plugins' old calls still work -------------------------------
@dataclasses.dataclass
class PluginConfig:
    """A third-party decoder's options, written against the old `option(default, help, min=, max=, ...)`."""

    k: int = option(3, "top-k", min=1, max="vocab_size")
    alpha: float = option(0.7, "mix", min=0.0, max=1.0, max_open=True)
    mode: Literal["a", "b"] = option("a", "a mode")


@dataclasses.dataclass
class HandMade:
    """Options declared by hand with the flat metadata keys `option` once wrote: still range-checked."""

    alpha: float = dataclasses.field(default=0.5, metadata={"help": "mix", "min": 0.0, "max": 1.0, "max_open": True})


def test_plugin_options_parse_and_check_as_before():
    config = parse_options(PluginConfig, {"k": "5", "alpha": "0.25", "mode": "b"}, decoder="mine")
    assert (config.k, config.alpha, config.mode) == (5, 0.25, "b")
    assert dataclasses.fields(PluginConfig)[0].metadata["cli"] is None  # no flag of its own: --opt sets it
    with pytest.raises(ConfigError) as caught:
        parse_options(PluginConfig, {"alpha": "1.0"}, decoder="mine")
    assert caught.value.line() == "--opt: alpha=1.0 is out of range [0.0, 1.0) (pick alpha in [0.0, 1.0))"
    with pytest.raises(ConfigError) as caught:
        parse_options(PluginConfig, {"k": "0"}, decoder="mine")
    assert caught.value.line() == "--opt: k=0 is out of range [1, inf] (pick k in [1, inf])"
    with pytest.raises(ConfigError, match=r"alpha=2.0 is out of range \[0.0, 1.0\)"):
        parse_options(HandMade, {"alpha": "2"}, decoder="mine")


def test_model_bound_and_details_use_the_shared_formatter():
    class Model:
        vocab_size = 10

    check_model_options(PluginConfig(k=10), Model())
    with pytest.raises(ConfigError) as caught:
        check_model_options(PluginConfig(k=11), Model())
    assert caught.value.line() == "--opt: k=11 is above the model's vocab size (10) (pick k in [1, 10])"
    rows = {r["name"]: r["range"] for r in describe_options(PluginConfig)}
    assert rows == {"k": "[1, vocab_size]", "alpha": "[0.0, 1.0)", "mode": ""}


@pytest.mark.parametrize("kwargs, expect", [
    ({"top_k": 0}, "top-k must be an integer >= 1, got 0"),
    ({"top_p": 0.0}, "top-p must be in (0, 1], got 0.0"),
    ({"top_p": math.nan}, "top-p must be in (0, 1], got nan"),
    ({"min_p": 1.5}, "min-p must be in [0, 1], got 1.5"),
])
def test_sampling_filters_use_the_shared_checker(kwargs, expect):
    with pytest.raises(ConfigError, match=expect.replace("(", r"\(").replace("[", r"\[").replace("]", r"\]")):
        check_sampling(**{"top_k": None, "top_p": None, "min_p": None, **kwargs})


def test_a_panel_reaches_typer():
    @dataclasses.dataclass
    class Paneled:
        size: int = command_option(8, "rows", cli=Cli(panel="Decoding"))

    (size,) = typer_parameters(Paneled)
    assert size.default.rich_help_panel == "Decoding"
    assert typer_parameters(Old)[0].default.rich_help_panel is None  # no panel: Typer's default one


def test_help_snapshot_script_walks_every_command():
    """scripts/help_snapshot.py (the before/after --help diff of refactors) finds every command and subcommand."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "help_snapshot.py"
    spec = importlib.util.spec_from_file_location("help_snapshot", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    paths = module.command_paths()
    assert {(), ("generate",), ("serve",), ("bench",), ("bench", "run"), ("bench", "score")} <= set(paths)
    assert module.file_name(("bench", "run")) == "evotok_bench_run.txt"
    text = module.help_text(("decoders",))
    assert text.startswith("Usage: ") and text.endswith("[exit 0]\n")
