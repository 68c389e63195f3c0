"""Checkpoints: safetensors (tensors only, never pickle) + a JSON description, both written atomically.

`name.safetensors` holds the tensors and, in its metadata, the JSON description (the authoritative copy);
`name.json` beside it repeats the description for humans and tools. Each file is written to a temporary
name in the same folder, flushed to disk and renamed over the old one, so a crash never leaves a
half-written checkpoint under the real name. `save_model` / `load_model` store any of the package's models
with its class name and config, so a checkpoint rebuilds its own model.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from minidit.mmdit import MMDiT, MMDiTConfig
from minidit.models import DiT, DiTConfig
from minidit.t2i import T2IConfig, TextToImage

FORMAT, VERSION = "minidit-checkpoint", 2
MODEL_CLASSES = {"DiT": (DiT, DiTConfig), "MMDiT": (MMDiT, MMDiTConfig), "TextToImage": (TextToImage, T2IConfig)}


class CheckpointError(ValueError):
    """A file that is not a (complete, compatible) minidit checkpoint."""


def weights_path(name: str) -> Path:
    """Path of weights shipped with the package, e.g. weights_path('vae_mnist_f4c4')."""
    return Path(str(importlib.resources.files("minidit") / "weights" / f"{name}.safetensors"))


def atomic_write(path: str | Path, write) -> Path:
    """Call write(temporary path) in `path`'s folder, flush it to disk, then rename it over `path`."""
    path = Path(path)
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
    return path


def write_json(path: str | Path, obj) -> Path:
    """Write `obj` as indented JSON to `path` atomically (folders created; a crash never leaves half a file)."""
    text = json.dumps(obj, indent=1) + "\n"  # serialise first: an unserialisable object leaves no file behind
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write tensors + meta (JSON-serialisable dict with a 'kind') to `path` (.safetensors) and `path`.json."""
    path = Path(path)
    if path.suffix != ".safetensors" or "kind" not in meta:
        raise ValueError(f"a checkpoint path ends in .safetensors and its meta has a 'kind', got {path.name!r}, "
                         f"{sorted(meta)}")
    text = json.dumps({"format": FORMAT, "version": VERSION, **meta}, indent=2, sort_keys=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={FORMAT: text}))
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text + "\n"))
    return path


def read_meta(path: str | Path) -> dict:
    """The JSON description stored inside a checkpoint (raises CheckpointError for anything else)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
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
        return load_file(str(path)), meta
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} could not be read completely (truncated?): {e}") from None


def load_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "", what: str = "model"):
    """Load `prefix`-ed tensors into a module (in its dtype); a missing, extra or mis-shaped tensor is an error."""
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    own = module.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or extra or shapes:
        raise CheckpointError(f"{what} weights do not match its config: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}, shape mismatches {shapes[:5]}")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def build_config(config_class: type, d: dict):
    """A config dataclass from its dict (a checkpoint's JSON); unknown or invalid fields are a CheckpointError."""
    try:
        return config_class(**d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"not a valid {config_class.__name__}: {e}") from None


def save_model(path: str | Path, model: torch.nn.Module, half: bool = False, **meta) -> Path:
    """Model weights (fp16 with `half`, small enough to ship) + its class and config, for sampling and sharing."""
    state = {k: v.half() if half and v.is_floating_point() else v for k, v in model.state_dict().items()}
    return save_checkpoint(path, state, {"kind": "model", "model": type(model).__name__,
                                         "config": model.config.to_dict(), **meta})


def load_model(path: str | Path, use_ema: bool = True, device: torch.device | str = "cpu",
               classes: dict[str, tuple[type, type]] | None = None) -> torch.nn.Module:
    """A model (fp32, eval mode) from a 'model' checkpoint or a training state (its EMA weights unless use_ema=False).

    `classes` adds model classes by name ({name: (model class, config class)}), e.g. minidit.variants'."""
    known = {**MODEL_CLASSES, **(classes or {})}
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") not in ("model", "train-state") or meta.get("model") not in known:
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r} checkpoint of {meta.get('model')!r}, not one of "
                              f"the models {sorted(known)}")
    model_class, config_class = known[meta["model"]]
    model = model_class(build_config(config_class, meta["config"]))
    prefix = "" if meta["kind"] == "model" else ("ema." if use_ema else "model.")
    load_state(model, tensors, prefix, f"{meta['model']} ({path})")
    return model.to(device).eval()
