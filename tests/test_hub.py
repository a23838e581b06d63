"""Hub ids (issue 31, item 4): `-m org/name` and `--adapter org/name` from huggingface_hub's cache, offline,
in the layout the library writes (models--org--name/snapshots/<commit>/ with files linked to ../../blobs/,
refs/main naming the commit); nothing cached is one line naming `evotok download`; the download fetches
safetensors, configs and tokenizer files only."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from evotok_cli.assets import default_model_path
from evotok_cli.runtime import hub
from tests.conftest import one_line_error

COMMIT = "0123456789abcdef0123456789abcdef01234567"
GEN = ["--gen-length", "8", "--steps", "4", "--block-length", "8"]


def cache_repo(cache: Path, repo_id: str, source: Path) -> Path:
    """`source`'s files as huggingface_hub caches a repository: blobs by sha256, a snapshot of relative links."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = root / "snapshots" / COMMIT
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def cache(tmp_path, tiny_llada) -> Path:
    folder = tmp_path / "hub"
    cache_repo(folder, "evotok-test/tiny-llada", tiny_llada)
    cache_repo(folder, "evotok-test/cts", default_model_path() / "adapters" / "cts")
    return folder


def offline(cache: Path) -> dict[str, str]:
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def test_model_id_decodes_from_the_cache_as_its_folder_does(cli, cache, tiny_llada):
    by_id = cli("generate", "-m", "evotok-test/tiny-llada", "-p", "hi", *GEN, env=offline(cache))
    by_path = cli("generate", "-m", str(tiny_llada), "-p", "hi", *GEN)
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stdout == by_path.stdout
    info = cli("info", "evotok-test/tiny-llada", "--json", env=offline(cache))
    assert info.returncode == 0, info.stderr
    assert COMMIT in info.stdout  # the snapshot folder is what was inspected


def test_adapter_id_is_the_same_adapter_as_the_shipped_one(cli, cache):
    prompt = "Sudoku 4x4 (0 = blank):\n0012|0230|4320|0103"
    by_id = cli("generate", "--adapter", "evotok-test/cts", "-p", prompt, *GEN, env=offline(cache))
    shipped = cli("generate", "--adapter", "cts", "-p", prompt, *GEN)
    plain = cli("generate", "-p", prompt, *GEN)
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stdout == shipped.stdout
    assert shipped.stdout != plain.stdout  # 4 passes for 8 tokens: the adapter shows


def test_nothing_cached_offline_is_one_line_naming_the_download(cli, cache):
    line = one_line_error(cli("generate", "-m", "evotok-test/absent", "-p", "hi", env=offline(cache)))
    assert "no Hugging Face model evotok-test/absent in the cache" in line
    assert "evotok download evotok-test/absent" in line
    line = one_line_error(cli("generate", "--adapter", "evotok-test/absent", "-p", "hi", env=offline(cache)))
    assert line.startswith("error: --adapter:") and "evotok download evotok-test/absent" in line


def test_a_local_folder_of_that_shape_wins(cli, tmp_path, tiny_llada, monkeypatch):
    shutil.copytree(tiny_llada, tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    assert not hub.is_hub_id("org/name") and hub.is_hub_id("org/other")
    r = cli("generate", "-m", "org/name", "-p", "hi", *GEN, env=offline(tmp_path / "empty-hub"))
    assert r.returncode == 0, r.stderr


def test_download_refuses_offline_and_bad_ids(cli):
    line = one_line_error(cli("download", "org/name", env={"HF_HUB_OFFLINE": "1"}))
    assert "HF_HUB_OFFLINE is set" in line
    assert "is not a Hugging Face id" in one_line_error(cli("download", "../etc"))


def test_download_fetches_only_weights_configs_and_tokenizers(cli, tmp_path, monkeypatch):
    import huggingface_hub

    asked = {}

    def fake_snapshot_download(repo_id, **kwargs):  # the network is the one thing not exercised here
        asked.update(kwargs, repo_id=repo_id)
        folder = tmp_path / "snap"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text("{}")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    r = cli("download", "org/name", "--revision", "v1", env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert r.returncode == 0, r.stderr
    assert asked["repo_id"] == "org/name" and asked["revision"] == "v1" and asked["allow_patterns"] == hub.ALLOW
    assert asked["cache_dir"] == str(tmp_path / "hub")
    wanted = ["model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "config.json",
              "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "chat_template.jinja", "adapter_config.json", "adapter_model.safetensors"]
    never = ["pytorch_model.bin", "model.pt", "training_args.bin", "optimizer.pth", "model.ckpt", "data.pkl",
             "modeling_llada.py", "configuration_llada.py"]
    assert all(hub.allowed(n) for n in wanted)
    assert not any(hub.allowed(n) for n in never)
