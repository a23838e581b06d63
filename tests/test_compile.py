"""--compile: the compiled forward decodes the same tokens as the eager one, and is refused in one line
where torch.compile cannot work (see evotok_cli/runtime/compile.py)."""

from __future__ import annotations

import time

import pytest
import torch

from evotok_cli.decoding.api import GenerationRequest
from evotok_cli.errors import ConfigError
from evotok_cli.generation import make_decoder
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

    from evotok_cli.errors import EvotokError
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
