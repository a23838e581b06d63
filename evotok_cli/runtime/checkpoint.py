"""Find, validate and read a checkpoint folder in the Hugging Face layout.

Only safetensors are read (single `model.safetensors` or a sharded `model.safetensors.index.json`); pickle
weights are refused because unpickling runs arbitrary code. Nothing from the folder is ever executed.

A folder is untrusted, and so is its index: every shard its weight_map names must be a plain file name in
the folder itself (`model-00001-of-00004.safetensors`), never a path (`../../x.safetensors`, `/etc/x`,
`sub/x`), so the index cannot reach a file outside the folder. The file under that name may be a symbolic
link wherever it points: a Hugging Face cache snapshot is exactly that (each file a link into
`../../blobs/`), and whoever can put a link in the folder could put the file there as well.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evotok_cli.base.errors import CheckpointError, DataError
from evotok_cli.base.files import input_dir, read_text
from evotok_cli.base.options import DuplicateKey, line_of_repeat, unique_keys

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
CONVERT_HINT = (
    "convert it once on a trusted machine: python -c \"import torch, safetensors.torch as s; "
    "s.save_file(torch.load('pytorch_model.bin'), 'model.safetensors', metadata={'format': 'pt'})\""
)


def model_dir(path: str | Path) -> Path:
    """The checkpoint folder, or one line saying why it is not one (missing, a file, a symlink loop)."""
    return input_dir(path, what="model folder", error=CheckpointError,
                     fix="pass a Hugging Face checkpoint folder with config.json and safetensors weights")


def read_json(path: Path, what: str, *, unique: bool = False) -> dict[str, Any]:
    """A JSON object from the checkpoint or adapter folder; every way of failing is one line naming the file.
    unique: a key written twice in an object is refused (for evotok's own settings, where the second
    would silently win)."""
    if not os.path.lexists(path):
        raise CheckpointError(f"no {path.name}", where=str(path.parent), fix=f"the folder needs its {what}")
    fix = f"repair or re-download {what}"
    try:
        text = read_text(path, what=what, fix=fix, error=CheckpointError)
    except DataError as exc:  # not UTF-8: a damaged download, so a checkpoint problem
        raise CheckpointError(exc.what, where=exc.where, fix=fix) from None
    try:
        data = json.loads(text, object_pairs_hook=unique_keys if unique else None)
    except DuplicateKey as exc:
        line = line_of_repeat(text, exc.key)
        raise CheckpointError(str(exc), where=f"{path}:{line}" if line else str(path),
                              fix="keep one of its values") from None
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, or an integer of 4300+ digits
        raise CheckpointError(f"not valid JSON ({exc})", where=str(path), fix=fix) from None
    if not isinstance(data, dict):
        raise CheckpointError("expected a JSON object", where=str(path), fix=fix)
    return data


def read_config(folder: Path) -> dict[str, Any]:
    return read_json(folder / "config.json", "config.json")


GENERATION_KEYS = ("gen_length", "block_length", "steps")
TEXT_GENERATION_KEYS = ("prefill",)  # text a model was trained to see right after the chat template


def generation_defaults(folder: Path) -> dict[str, int | str]:
    """Decoding defaults a checkpoint ships for itself: the "evotok" section of its generation_config.json
    (a model trained on 48-token answers should not be asked for 128 by default)."""
    path = folder / "generation_config.json"
    if not os.path.lexists(path):
        return {}
    section = read_json(path, "generation_config.json", unique=True).get("evotok") or {}
    if not isinstance(section, dict):
        raise CheckpointError('"evotok" must be an object', where=str(path),
                              fix='write e.g. {"evotok": {"gen_length": 48}}')
    def ok(key: str, value: object) -> bool:
        if key in TEXT_GENERATION_KEYS:
            return isinstance(value, str)
        return key in GENERATION_KEYS and isinstance(value, int) and not isinstance(value, bool) and value > 0

    bad = [k for k, v in section.items() if not ok(k, v)]
    if bad:
        raise CheckpointError(f"unsupported or invalid entry {bad[0]!r} in \"evotok\"", where=str(path),
                              fix=f"use positive integers for {', '.join(GENERATION_KEYS)} and a string for prefill")
    return dict(section)


@dataclass(frozen=True)
class WeightFiles:
    """Where each tensor lives: name -> shard file."""

    files: tuple[Path, ...]
    index: dict[str, Path] | None  # None for a single-file checkpoint

    @property
    def sharded(self) -> bool:
        return self.index is not None


def find_weights(folder: Path) -> WeightFiles:
    index_path, single = folder / INDEX_FILE, folder / SINGLE_FILE
    if index_path.is_file():
        index = read_json(index_path, INDEX_FILE)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError("no weight_map", where=str(index_path), fix="repair or re-download the index")
        shards = {name: folder / shard_name(shard, index_path) for name, shard in weight_map.items()}
        for shard in sorted(set(shards.values())):
            if not shard.is_file():
                raise CheckpointError(f"index names shard {shard.name}, which is missing", where=str(index_path),
                                      fix="download the missing shard or repair the index")
        return WeightFiles(tuple(sorted(set(shards.values()))), shards)
    if single.is_file():
        return WeightFiles((single,), None)
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern))
    if pickles:
        raise CheckpointError(f"only pickle weights found ({', '.join(pickles)}); evotok never unpickles",
                              where=str(folder), fix=CONVERT_HINT)
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE}", where=str(folder),
                          fix="the folder needs safetensors weights in the Hugging Face layout")


def shard_name(name: object, index_path: Path) -> str:
    """A shard the index names, if it is a plain file name in the folder (see the module docstring)."""
    fix = "the index may only name files beside it (e.g. model-00001-of-00002.safetensors): repair or re-download it"
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"weight_map names a shard {name!r}, not a file name", where=str(index_path), fix=fix)
    path = Path(name)
    if path.is_absolute() or len(path.parts) != 1 or name in (".", "..") or "\\" in name or "\0" in name:
        raise CheckpointError(f"weight_map names {name!r}, a path, not a file in the model folder",
                              where=str(index_path), fix=fix)
    return name


def _open(path: Path, device: str):
    from safetensors import safe_open
    try:
        return safe_open(str(path), framework="pt", device=device)
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"unreadable safetensors file ({exc})", where=str(path),
                              fix="the file is truncated or corrupt: download it again") from None


def tensor_shapes(weights: WeightFiles) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """name -> (shape, dtype, file) read from the headers only (cheap, no tensor data)."""
    out: dict[str, tuple[tuple[int, ...], str, Path]] = {}
    for path in weights.files:
        with _open(path, "cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                if weights.index is not None and weights.index.get(name) != path:
                    continue  # a tensor the index places elsewhere (or not at all)
                sl = f.get_slice(name)
                out[name] = (tuple(sl.get_shape()), str(sl.get_dtype()), path)
    if weights.index is not None:
        for name, path in weights.index.items():
            if name not in out:
                raise CheckpointError(f"index maps tensor {name} to {path.name}, which does not contain it",
                                      where=str(path), fix="repair the index or re-download the shard")
    return out


# safetensors dtype names of the weights we can cast: integer, bool or 8-bit float tensors are quantized
# or damaged, and casting them to floats would load silently and compute garbage.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def check_float(name: str, dtype: str, path: Path) -> None:
    if dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"tensor {name} has dtype {dtype}; evotok loads floating-point weights only "
                              f"({', '.join(FLOAT_DTYPES)})", where=str(path),
                              fix="quantized or integer weights are not supported: use the original float checkpoint")


def check_tensors(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[tuple[int, ...], str, Path]],
                  where: str) -> None:
    """Strict: every parameter present with its exact shape and a float dtype, nothing extra."""
    missing = sorted(set(expected) - set(found))
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {missing[0]}{more}", where=where,
                              fix="the weights do not match config.json; re-download or fix the config")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        more = f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"unexpected tensor {unexpected[0]}{more} in {found[unexpected[0]][2].name}",
                              where=where, fix="the weights belong to another architecture or config")
    for name, shape in expected.items():
        if tuple(found[name][0]) != tuple(shape):
            raise CheckpointError(
                f"tensor {name} has shape {list(found[name][0])}, config.json implies {list(shape)}",
                where=str(found[name][2]), fix="the weights do not match config.json")
        check_float(name, found[name][1], found[name][2])


def iter_tensors(weights: WeightFiles, device: str) -> Iterator[tuple[str, torch.Tensor]]:
    for path in weights.files:
        with _open(path, device) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                if weights.index is not None and weights.index.get(name) != path:
                    continue
                try:
                    yield name, f.get_tensor(name)
                except Exception as exc:
                    raise CheckpointError(f"cannot read tensor {name} ({exc})", where=str(path),
                                          fix="the file is truncated or corrupt: download it again") from None


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write atomically (temp file + rename) with the `format: pt` metadata transformers expects."""
    from safetensors.torch import save_file
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
        tmp.replace(path)
    except BaseException:  # a full disk or an interrupt: leave no half-written .tmp beside the weights
        tmp.unlink(missing_ok=True)
        raise
