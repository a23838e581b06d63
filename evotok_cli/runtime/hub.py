"""Hugging Face hub ids (`-m org/name`, `--adapter org/name`): found in huggingface_hub's local cache, never
fetched implicitly; `evotok download org/name` is the one command that goes online.

A value is a hub id when it has the shape `org/name` and no such local path exists (a local folder always
wins). The cache is the one transformers, vLLM and litgpt use (HF_HUB_CACHE, else HF_HOME/hub, else
~/.cache/huggingface/hub), read at call time. A download fetches only what evotok reads: safetensors
weights, JSON configs and tokenizer files (`ALLOW`), never pickles (*.bin, *.pt, *.pth, *.ckpt, *.pkl) nor
remote code (*.py); a cache snapshot's files are links into ../../blobs/, which the checkpoint loader accepts.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

from evotok_cli.base.errors import CheckpointError, ConfigError

ALLOW = ["*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt", "*.jinja",
         "README.md"]
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def is_hub_id(value: str | Path | None) -> bool:
    """`org/name` that names no local path (relative paths of that shape that exist stay paths)."""
    if value is None or isinstance(value, Path):
        return False
    text = str(value)
    return bool(_ID.fullmatch(text)) and ".." not in text and not os.path.lexists(os.path.expanduser(text))


def cache_dir() -> Path:
    """huggingface_hub's cache folder, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def allowed(name: str) -> bool:
    """Whether `evotok download` fetches the repository file `name` (a path inside the repository)."""
    base = name.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(base, pattern) for pattern in ALLOW)


def resolve(repo_id: str, *, what: str = "model", where: str = "--model") -> Path:
    """The cached snapshot folder of `repo_id` (its refs/main), offline; one line naming the download command
    when the cache lacks it."""
    from huggingface_hub import snapshot_download

    cache = cache_dir()
    try:
        return Path(snapshot_download(repo_id, cache_dir=str(cache), local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError and kin: the library's names change between versions
        if type(exc).__name__ not in ("LocalEntryNotFoundError", "EntryNotFoundError", "FileNotFoundError",
                                      "HFValidationError", "OfflineModeIsEnabled"):
            raise
    raise CheckpointError(f"no local folder {repo_id} and no Hugging Face {what} {repo_id} in the cache {cache}",
                          where=where, fix=f"download it with `evotok download {repo_id}`, or pass a folder")


def download(repo_id: str, *, revision: str | None = None) -> Path:
    """Fetch `repo_id`'s safetensors, configs and tokenizer files into the cache (progress bars on stderr);
    returns the snapshot folder."""
    if not _ID.fullmatch(repo_id) or ".." in repo_id:
        raise ConfigError(f"{repo_id!r} is not a Hugging Face id", where="evotok download",
                          fix="e.g. evotok download GSAI-ML/LLaDA-8B-Instruct")
    if offline():
        raise ConfigError("HF_HUB_OFFLINE is set, so nothing can be downloaded", where="evotok download",
                          fix="unset HF_HUB_OFFLINE, or copy the checkpoint folder here and pass its path")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=str(cache_dir()), allow_patterns=ALLOW)
    except Exception as exc:  # not found, gated, no network: one line with the library's reason
        name = type(exc).__name__
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else name
        if name in ("RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError"):
            fix = "check the id (and --revision); a gated model needs `hf auth login` and accepted terms"
        else:
            fix = "check the network connection and try again"
        raise CheckpointError(f"download failed ({name}: {reason})", where=repo_id, fix=fix) from None
    return Path(folder)
