"""Checkpoints: safetensors (tensors only, never pickle) + a JSON description, both written atomically.

`name.safetensors` holds the tensors and, in its metadata, the JSON description (the authoritative copy);
`name.json` beside it repeats the description for humans and tools. Each file is written to a temporary
name in the same folder, flushed to disk and renamed over the old one, so a crash never leaves a
half-written checkpoint under the real name.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

FORMAT = "minidit-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a (complete, compatible) minidit checkpoint."""


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj) -> Path:
    """Write `obj` as indented JSON to `path` atomically (folders created; a crash never leaves half a file)."""
    path = Path(path)
    text = json.dumps(obj, indent=1) + "\n"  # serialise first: an unserialisable object leaves no file behind
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write tensors + meta (JSON-serialisable dict with a 'kind') to `path` (.safetensors) and `path`.json."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {path.name!r}")
    if "kind" not in meta:
        raise ValueError("checkpoint meta needs a 'kind' (e.g. 'dit', 'train-state', 'classifier')")
    meta = {"format": FORMAT, "version": VERSION, **meta}
    text = json.dumps(meta, indent=2, sort_keys=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={FORMAT: text}))
    _atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text + "\n"))
    return path


def read_meta(path: str | Path) -> dict:
    """The JSON description stored inside a checkpoint (raises CheckpointError for anything else)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with open(path, "rb") as f:
        head = f.read(9)  # safetensors: 8-byte little-endian header length, then the JSON header ('{')
    if head[8:9] != b"{" and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise CheckpointError(f"{path} is a pickle/zip (torch.save) file; minidit only reads safetensors and "
                              "never unpickles. Convert it with safetensors.torch.save_file.")
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from None
    if FORMAT not in md:
        raise CheckpointError(f"{path} is a safetensors file but not a minidit checkpoint (no '{FORMAT}' metadata)")
    meta = json.loads(md[FORMAT])
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {meta.get('version')}, this minidit reads {VERSION}")
    return meta


def load_checkpoint(path: str | Path, kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors on CPU, meta). With `kind`, also check the checkpoint is of that kind."""
    meta = read_meta(path)
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r} checkpoint, expected {kind!r}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} could not be read completely (truncated?): {e}") from None
    return tensors, meta


def load_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "", what: str = "model"):
    """Load `prefix`-ed tensors into a module; a missing, extra or mis-shaped tensor is a CheckpointError."""
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or extra or shapes:
        raise CheckpointError(f"{what} weights do not match its config: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}, shape mismatches {shapes[:5]}")
    module.load_state_dict(state)


def config_from_dict(cls, d: dict):
    """A dataclass config from its dict (e.g. a checkpoint's JSON); unknown keys raise an error naming them."""
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {sorted(unknown)}; expected a subset of {sorted(known)}")
    return cls(**d)
