"""Decoder plugins: a third-party package found through its entry point, a broken plugin that breaks
nothing else, and properties every registered decoder must have."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evotok_cli.decoding import registry
from evotok_cli.decoding.api import GenerationRequest, parse_options
from evotok_cli.runtime.cache import RowBatch

ROOT = Path(__file__).resolve().parents[1]
GEN = ["--gen-length", "8", "--block-length", "4", "--steps", "4"]


def _cli(args, extra_path: Path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(extra_path), str(ROOT)]), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "evotok_cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory) -> Path:
    """pip-install examples/third_party_decoder into a private folder (no network, no build isolation), from
    a copy: pip builds a local folder in place, leaving build/ and *.egg-info in it."""
    source = tmp_path_factory.mktemp("src") / "third_party_decoder"
    shutil.copytree(ROOT / "examples" / "third_party_decoder", source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)],
                   check=True, capture_output=True)
    return target


def test_third_party_decoder_runs_through_the_cli(installed_example, tiny_llada):
    listing = json.loads(_cli(["decoders", "--json"], installed_example).stdout)["decoders"]
    entry = next(d for d in listing if d["name"] == "left-to-right")
    assert entry["ok"] and entry["package"] == "evotok-left-to-right" and entry["version"] == "0.1.0"
    proc = _cli(["generate", "-m", str(tiny_llada), "-p", "hi", "-d", "left-to-right", "--opt", "tokens_per_step=2",
                 "--trace", str(installed_example / "t.jsonl"), *GEN, "--json"], installed_example)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["results"][0]["token_ids"]) == 8
    commits = [json.loads(line)["committed"] for line in (installed_example / "t.jsonl").read_text().splitlines()]
    assert commits == [[0, 1], [2, 3], [4, 5], [6, 7]]  # strictly left to right, two per pass
    bad = _cli(["generate", "-m", str(tiny_llada), "-p", "hi", "-d", "left-to-right", "--opt", "tokens_per_step=0",
                *GEN], installed_example)
    assert bad.returncode == 2 and "out of range" in bad.stderr


@pytest.fixture(scope="module")
def broken_plugin(tmp_path_factory) -> Path:
    """A distribution whose decoder module raises on import."""
    site = tmp_path_factory.mktemp("broken")
    dist = site / "evotok_broken-0.0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: evotok-broken\nVersion: 0.0.1\n")
    (dist / "entry_points.txt").write_text("[evotok.decoders]\nbroken = evotok_broken_plugin:Decoder\n")
    (site / "evotok_broken_plugin.py").write_text("raise ImportError('this plugin is broken on purpose')\n")
    return site


def test_a_broken_plugin_breaks_nothing_else(broken_plugin, tiny_llada):
    listing = json.loads(_cli(["decoders", "--json"], broken_plugin).stdout)["decoders"]
    broken = next(d for d in listing if d["name"] == "broken")
    assert not broken["ok"] and "broken on purpose" in broken["error"]
    assert all(d["ok"] for d in listing if d["name"] != "broken")
    assert _cli(["generate", "-m", str(tiny_llada), "-p", "hi", *GEN], broken_plugin).returncode == 0
    proc = _cli(["generate", "-m", str(tiny_llada), "-p", "hi", "-d", "broken", *GEN], broken_plugin)
    assert proc.returncode == 2 and "failed to load" in proc.stderr and "Traceback" not in proc.stderr


class RecordingModel:
    """The real tiny model; records what each forward pass is fed at the prompt positions."""

    def __init__(self, model):
        self.model, self.fed = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, input_ids=None, **kw):
        embeds = kw.get("inputs_embeds")
        if kw.get("soft_inputs") is not None:
            embeds = self.model.embed_soft(*kw["soft_inputs"])
        self.fed.append((input_ids, embeds, kw.get("start", 0), kw.get("cache")))
        return self.model(input_ids, **kw)


DECODER_OPTIONS = {"hard-mask": [{}, {"threshold": 0.3}, {"cache": "dual"}],
                   "evotoken": [{}, {"k_soft": 1, "alpha": 0.0}, {"cache": "prefix"}],
                   "d2f": [{"block_size": 4}, {"block_size": 4, "soft": True, "skip_threshold": 0.5}]}


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_decoder_keeps_its_contract(tiny_model, data):
    name = data.draw(st.sampled_from(sorted(DECODER_OPTIONS)))
    options = data.draw(st.sampled_from(DECODER_OPTIONS[name]))
    prompts = data.draw(st.lists(st.lists(st.integers(5, 200), min_size=1, max_size=6), min_size=1, max_size=3))
    blocks = data.draw(st.sampled_from([1, 2]))
    gen, steps = 4 * blocks, data.draw(st.sampled_from([blocks, 2 * blocks, 4 * blocks, 8 * blocks]))
    cls = registry.get(name)
    decoder = cls(parse_options(cls.Config, options, decoder=name))
    recorder = RecordingModel(tiny_model)
    request = GenerationRequest(prompts=prompts, gen_length=gen, block_length=4, steps=steps)
    out = decoder.generate(recorder, request)
    for row in out.rows:
        assert len(row.token_ids) == gen and tiny_model.mask_id not in row.token_ids  # no [MASK] left
        assert 1 <= row.nfe <= gen  # at least one token per pass
        if name != "d2f" and "threshold" not in options:
            assert row.nfe == min(steps, gen)
    again = decoder.generate(tiny_model, request)
    assert [r.token_ids for r in again.rows] == [r.token_ids for r in out.rows]  # deterministic at T = 0
    longest = max(len(p) for p in prompts)
    for ids, embeds, start, cache in recorder.fed:  # the prompt is fed unchanged in every pass
        if start > 0:
            continue
        fed = embeds if embeds is not None else tiny_model.embed(ids)
        if name == "d2f":  # rows are decoded one at a time, unpadded
            assert any(fed.shape[1] > len(p) and torch.allclose(fed[0, :len(p)], tiny_model.embed(torch.tensor(p)), atol=1e-6)
                       for p in prompts)
            continue
        if isinstance(cache, RowBatch):  # the engine's rows packed end to end: a span is a canvas (after its padding)
            rows = [fed[0, a + pad - first:b] for (a, b), first, pad in zip(cache.spans, cache.starts, cache.key_pads)
                    if first <= pad]  # fed from the row's first real column on (padding columns are not fed)
        else:  # a left-padded batch
            rows = [fed[b, longest - len(p):] for b, p in enumerate(prompts)]
        assert len(rows) == len(prompts)
        for row, p in zip(rows, prompts):
            assert torch.allclose(row[:len(p)], tiny_model.embed(torch.tensor(p)), atol=1e-6)


def test_the_built_in_decoders_install_under_a_name_of_our_own():
    """The folder plugins/evotok_plugins installs as `evotok_plugins`: no top-level `plugins` package, which
    any other project could also install, and every built-in decoder's entry point under our name."""
    from importlib import metadata

    dist = metadata.distribution("evotok")
    top_level = set((dist.read_text("top_level.txt") or "").split())
    assert top_level == {"evotok_cli", "evotok_plugins"}, "reinstall: pip install -e ."
    record = dist.read_text("RECORD")  # installed files; an in-tree egg-info's SOURCES.txt lists source paths
    assert not [line for line in (record or "").splitlines() if line.startswith("plugins/")]
    ours = {ep.name: ep.value for ep in dist.entry_points if ep.group == registry.GROUP}
    assert ours == {"hard-mask": "evotok_plugins.hard_mask.decoder:HardMaskDecoder",
                    "evotoken": "evotok_plugins.evotoken.decoder:EvoTokenDecoder", "d2f": "evotok_plugins.d2f.decoder:D2FDecoder"}
    assert {name: registry.get(name).__module__ for name in ours} == {
        name: value.partition(":")[0] for name, value in ours.items()}


def test_the_package_find_reaches_every_package_folder():
    """pyproject.toml finds the packages (`[tool.setuptools.packages.find]`, over . and plugins/): every
    folder holding Python files must be a package it finds, or the wheel would miss it while the editable
    install still imports it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from setuptools import find_packages

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    found = {name for where in find["where"] for name in find_packages(where=str(ROOT / where), include=find["include"])}
    on_disk = set()
    for top, name in (("evotok_cli", "evotok_cli"), ("plugins/evotok_plugins", "evotok_plugins")):
        for source in (ROOT / top).rglob("*.py"):
            parts = source.parent.relative_to(ROOT / top).parts
            on_disk.add(".".join((name, *parts)))
    assert found == on_disk


def test_entry_points_of_installs_from_before_the_layer_folders_still_load():
    """An editable install made before the move names `evotok_plugins.d2f:D2FDecoder` and `evotok_cli.cli:main`
    until it is reinstalled: both still resolve, to the classes and function the new entry points name."""
    from importlib import metadata

    from evotok_cli.cli.app import main
    from evotok_plugins.d2f.decoder import D2FDecoder
    from evotok_plugins.evotoken.decoder import EvoTokenDecoder
    from evotok_plugins.hard_mask.decoder import HardMaskDecoder

    old = {"evotok_plugins.d2f:D2FDecoder": D2FDecoder, "evotok_plugins.evotoken:EvoTokenDecoder": EvoTokenDecoder,
           "evotok_plugins.hard_mask:HardMaskDecoder": HardMaskDecoder, "evotok_cli.cli:main": main}
    for value, target in old.items():
        assert metadata.EntryPoint("old", value, "evotok.decoders").load() is target
    with pytest.raises(AttributeError):
        metadata.EntryPoint("old", "evotok_plugins.d2f:NoSuchDecoder", "evotok.decoders").load()
