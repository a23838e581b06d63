"""--compile: the compiled forward decodes the same tokens as the eager one, and is refused in one line
where torch.compile cannot work (see evotok_cli/runtime/compile.py)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from evotok_cli.base.errors import ConfigError
from evotok_cli.decoding.api import GenerationRequest
from evotok_cli.jobs.generation import make_decoder
from evotok_cli.runtime.model import load_model

PROMPT = [5, 17, 33, 8, 21]


def _tokens(model, decoder: str, options: dict, **settings) -> list[int]:
    settings = {"gen_length": 8, "block_length": 4, "steps": 4, **settings}
    request = GenerationRequest(prompts=[PROMPT], temperature=0.0, seed=0, **settings)
    return make_decoder(decoder, options).generate(model, request).rows[0].token_ids


@pytest.mark.slow  # inductor on a CPU: about a minute per graph on a busy machine (seconds when cached)
def test_compiled_tokens_equal_eager(tiny_llada):
    """Three graphs (hard ids; soft inputs; a cache at start 0 and further on) and a canvas that changes
    length without a recompile, on the tiny model."""
    eager = load_model(tiny_llada)
    compiled = load_model(tiny_llada, compile=True)
    assert compiled.compiled and not eager.compiled
    t0 = time.perf_counter()
    for decoder, options in (("hard-mask", {}), ("evotoken", {}), ("evotoken", {"cache": "dual"})):
        assert _tokens(compiled, decoder, options) == _tokens(eager, decoder, options), (decoder, options)
    t1 = time.perf_counter()
    longer = {"gen_length": 16, "block_length": 8, "steps": 8}  # other lengths: the same graphs (dynamic)
    assert _tokens(compiled, "hard-mask", {}, **longer) == _tokens(eager, "hard-mask", {}, **longer)
    assert time.perf_counter() - t1 < max(10.0, (t1 - t0) / 3), "a new canvas length recompiled"


def test_compile_refused_without_a_compiler(monkeypatch):
    from evotok_cli.runtime import compile as compile_module

    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(ConfigError, match=r"--compile: torch.compile needs a C\+\+ compiler") as err:
        compile_module.check_compile(torch.device("cpu"))
    assert "drop --compile" in err.value.line()
    with pytest.raises(ConfigError, match="not supported on meta"):
        compile_module.check_compile(torch.device("meta"))


def test_compile_failure_is_one_line(monkeypatch, tiny_llada):
    """An error raised inside torch.compile (here: a backend that fails) becomes an EvotokError."""
    import torch._dynamo

    from evotok_cli.base.errors import EvotokError
    from evotok_cli.runtime import compile as compile_module

    def broken_backend(gm, example_inputs):
        raise RuntimeError("the compiler crashed")

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda net, **kw: real(net, backend=broken_backend, dynamic=True))
    model = load_model(tiny_llada)
    model.compiled_forward = compile_module.compile_forward(model.net)
    try:
        with pytest.raises(EvotokError, match="torch.compile failed") as err:
            model(torch.tensor([PROMPT]))
        assert "run without --compile" in err.value.line()
    finally:
        torch._dynamo.reset()


def test_a_new_mix_of_rows_makes_no_new_graph(tiny_llada, monkeypatch):
    """The engine's compiled forward over the slot pool (`decoding/engine.py: run_paged`): index and mask
    tensors instead of Python values per row, sizes in buckets. After a warm-up load, another load of other
    prompt lengths, cache modes and decoders builds no graph: a counting backend sees none, and a
    recompile would raise."""
    import torch._dynamo

    from evotok_cli.decoding.engine import Engine, make_jobs
    from evotok_cli.runtime.cache import SlotPool

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    from evotok_cli.runtime.compile import no_duck_shapes

    torch._dynamo.reset()
    no_duck_shapes()
    model = load_model(tiny_llada)
    compiled = torch.compile(model.net, backend=counting, dynamic=True)
    model.compiled_forward = lambda *args, **kwargs: compiled(*args, **kwargs)
    modes = [("hard-mask", {}), ("hard-mask", {"cache": "dual"}), ("evotoken", {"cache": "prefix"}),
             ("d2f", {"block_size": "4"}), ("evotoken", {})]

    def load(lengths: list[int], only: int | None = None) -> None:
        engine = Engine(model, max_rows=16)
        assert isinstance(engine.pool, SlotPool)
        jobs = []
        for i, n in enumerate(lengths):
            name, options = modes[i % len(modes) if only is None else only]
            request = GenerationRequest(prompts=[[5 + j for j in range(n)]], gen_length=8, block_length=4, steps=4,
                                        seeds=[i])
            jobs += [engine.submit(job) for _, job in make_jobs(model, make_decoder(name, options), request, cohort=1)]
        engine.run()
        assert all(job.error is None for job in jobs), [str(job.error) for job in jobs if job.error]

    try:
        load([3, 9, 5, 12, 7])
        load([2, 6])
        load([3, 9, 5], only=3)  # d2f rows merged: rows that feed windows of their own
        warm = len(graphs)
        assert warm > 0
        monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
        load([4, 11, 8, 3, 13, 6, 10])
        load([5])
        load([12, 2, 7, 4, 10], only=3)
        load([6, 8], only=1)  # hard-mask dual rows merged
        assert len(graphs) == warm
    finally:
        torch._dynamo.reset()


# -- levels: --compile [on|max|off] ------------------------------------------------------------------------
def test_levels_read_as_false_true_or_max():
    """The flag's text, EVOTOK_COMPILE's words and a --config file's bool all land on False, True or "max";
    anything else is one ConfigError that names the levels."""
    from evotok_cli.runtime.compile import compile_level

    cases = {None: False, False: False, True: True, "on": True, "ON": True, "true": True, "1": True, "max": "max",
             "Max": "max", "off": False, "false": False, "0": False, "": False}
    assert {k: compile_level(k) for k in cases} == cases
    for bad in ("bogus", "yes", "2", 2, 1.0, ["max"]):
        with pytest.raises(ConfigError, match=r"expected bool or a level on \| max \| off") as err:
            compile_level(bad)
        assert err.value.line().startswith("--compile: ")


def test_a_bare_compile_is_on_and_no_compile_is_off():
    """Typer cannot declare an optional value: the entry point rewrites the bare forms before parsing."""
    from evotok_cli.runtime.compile import bare_flags

    assert bare_flags(["generate", "--compile"]) == ["generate", "--compile=on"]
    assert bare_flags(["generate", "--compile", "--device", "cpu"]) == ["generate", "--compile=on", "--device", "cpu"]
    assert bare_flags(["generate", "--compile", "max", "-p", "x"]) == ["generate", "--compile", "max", "-p", "x"]
    assert bare_flags(["serve", "--compile=max", "--no-compile"]) == ["serve", "--compile=max", "--compile="]
    assert bare_flags(["generate", "--", "--compile"]) == ["generate", "--", "--compile"]


def test_max_is_refused_on_the_cpu_and_off_checks_nothing(monkeypatch):
    from evotok_cli.runtime.compile import check_compile

    with pytest.raises(ConfigError, match="max replays CUDA graphs, and cpu has none") as err:
        check_compile(torch.device("cpu"), "max")
    assert "use a bare --compile (on) on cpu" in err.value.line()
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert check_compile(torch.device("cpu"), "off") is False  # no compiler needed to run eagerly
    with pytest.raises(ConfigError, match="needs a C"):
        check_compile(torch.device("cpu"), "on")


def test_max_compiles_with_cuda_graphs_and_copies_the_logits(monkeypatch, tiny_llada):
    """`max` asks inductor for mode="reduce-overhead" (CUDA graphs), marks a graph step before each call and
    copies the logits out of the graph's memory; `on` keeps today's call. Read on the CPU through
    torch.compile's arguments and eager outputs (the graphs themselves need a GPU: benchmarks/gpu_check.py)."""
    from evotok_cli.runtime import compile as compile_module

    calls, steps = [], []
    monkeypatch.setattr(torch, "compile", lambda net, **kw: calls.append(kw) or net)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    model = load_model(tiny_llada)
    ids = torch.tensor([PROMPT])
    eager = model.net(ids)
    on = compile_module.compile_forward(model.net, True)
    assert calls[-1] == {"dynamic": True, "mode": None} and torch.equal(on(ids), eager) and steps == []
    graphs = compile_module.compile_forward(model.net, "max")
    assert calls[-1] == {"dynamic": True, "mode": "reduce-overhead"}
    out = graphs(ids)
    assert steps == [1] and torch.equal(out, eager) and out.data_ptr() != eager.data_ptr()


def test_the_level_is_recorded_as_compile(cli, tiny_llada, tmp_path):
    """--json params record `compile` as before (false / true) and "max" for max; the last of --compile,
    --no-compile and --config's `compile:` wins (here all off: nothing compiles on this CPU)."""
    from evotok_cli.runtime.model import DiffusionModel

    model = load_model(tiny_llada)
    assert model.compiled is False
    assert DiffusionModel(**{**model.__dict__, "compiled_forward": model.net, "compile_level": "max"}).compiled == "max"
    (tmp_path / "c.yaml").write_text("compile: true\n")
    args = ("generate", "-m", str(tiny_llada), "-p", "x", "--gen-length", "4", "--steps", "4", "--block-length", "4",
            "--json", "--config", str(tmp_path / "c.yaml"))
    for off in (["--no-compile"], ["--compile", "off"], ["--compile=off"]):
        proc = cli(*args, *off)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["params"]["compile"] is False
    proc = cli(*args[:-2], env={"EVOTOK_COMPILE": "0"})
    assert proc.returncode == 0 and json.loads(proc.stdout)["params"]["compile"] is False
