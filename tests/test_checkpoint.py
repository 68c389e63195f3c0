import json
import pickle
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from minidit import checkpoint as ck
from minidit.models import DiT, get_config, load_model, save_model


def test_roundtrip_with_json_beside(tmp_path):
    path = tmp_path / "a.safetensors"
    ck.save_checkpoint(path, {"w": torch.arange(6.0).reshape(2, 3)}, {"kind": "test", "note": "hi"})
    tensors, meta = ck.load_checkpoint(path, kind="test")
    assert torch.equal(tensors["w"], torch.arange(6.0).reshape(2, 3))
    assert meta["note"] == "hi" and meta["format"] == "minidit-checkpoint"
    assert json.loads((tmp_path / "a.json").read_text()) == meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.safetensors"]


def test_model_roundtrip(tmp_path):
    model = DiT(get_config("mnist-tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    save_model(tmp_path / "m.safetensors", model)
    loaded = load_model(tmp_path / "m.safetensors")
    x, t, y = torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([1, 2])
    assert torch.equal(model.eval()(x, t, y), loaded(x, t, y))


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    ck.save_checkpoint(path, {"w": torch.ones(3)}, {"kind": "test"})
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(path, {"w": torch.zeros(3)}, {"kind": "test"})
    assert path.read_bytes() == before  # the old checkpoint survives intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "c.safetensors"]  # no temp files left


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "t.safetensors"
    ck.save_checkpoint(path, {"w": torch.randn(100)}, {"kind": "test"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match="truncated"):
        ck.load_checkpoint(path)


def test_foreign_and_pickle_checkpoints(tmp_path):
    foreign = tmp_path / "f.safetensors"
    save_file({"w": torch.ones(2)}, str(foreign))
    with pytest.raises(ck.CheckpointError, match="not a minidit checkpoint"):
        ck.load_checkpoint(foreign)
    pt = tmp_path / "p.safetensors"
    torch.save({"w": torch.ones(2)}, pt)
    with pytest.raises(ck.CheckpointError, match="never unpickles"):
        ck.load_checkpoint(pt)
    raw = tmp_path / "r.safetensors"
    raw.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ck.CheckpointError, match="never unpickles"):
        ck.load_checkpoint(raw)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ck.load_checkpoint(tmp_path / "missing.safetensors")


def test_wrong_kind_and_mismatched_weights(tmp_path):
    path = tmp_path / "x.safetensors"
    ck.save_checkpoint(path, {"w": torch.ones(1)}, {"kind": "classifier"})
    with pytest.raises(ck.CheckpointError, match="expected 'train-state'"):
        ck.load_checkpoint(path, kind="train-state")
    model = DiT(get_config("mnist-tiny"))
    state = model.state_dict()
    state["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    del state["final_layer.linear.bias"]
    ck.save_checkpoint(path, state, {"kind": "model", "model": "DiT", "config": model.config.to_dict()})
    with pytest.raises(ck.CheckpointError, match="do not match"):
        load_model(path)


def test_path_must_be_safetensors(tmp_path):
    with pytest.raises(ValueError, match=".safetensors"):
        ck.save_checkpoint(tmp_path / "a.pt", {}, {"kind": "x"})


def test_header_length_that_looks_like_a_pickle_byte(tmp_path):
    """A valid checkpoint whose 8-byte header length starts with 0x80 (pickle's opcode) or 'PK' still loads."""

    def save(pad: int) -> tuple[Path, int]:
        path = ck.save_checkpoint(tmp_path / "c.safetensors", {"w": torch.ones(2)}, {"kind": "x", "pad": "p" * pad})
        return path, int.from_bytes(path.read_bytes()[:8], "little")

    _, base = save(0)
    for target, mod in ((0x80, 256), (0x4B50, 65536)):  # b"\x80", b"PK"
        start = (target - base) % mod
        for pad in range(max(0, start - 16), start + 16):  # header is padded to a multiple of 8 bytes
            path, n = save(pad)
            if n % mod == target:
                break
        else:
            pytest.fail(f"no padding made the header length {target:#x} mod {mod}")
        tensors, meta = ck.load_checkpoint(path, kind="x")
        assert torch.equal(tensors["w"], torch.ones(2)) and meta["pad"] == "p" * pad


@pytest.mark.parametrize("module, name", [("minidit.models", "DiTConfig"), ("minidit.mmdit", "MMDiTConfig"),
                                          ("minidit.t2i", "T2IConfig"), ("minidit.train", "TrainConfig"),
                                          ("minidit.vae", "VAEConfig")])
def test_every_config_round_trips_and_rejects_unknown_fields(module, name):
    import importlib

    cls = getattr(importlib.import_module(module), name)
    cfg = cls()
    d = json.loads(json.dumps(asdict(cfg)))
    assert cls.from_dict(d) == cfg
    with pytest.raises(ValueError, match=f"unknown {name} field.*'bogus'"):
        cls.from_dict({**d, "bogus": 1})


def test_write_json_creates_folders_and_never_leaves_half_a_file(tmp_path):
    from minidit.checkpoint import write_json

    target = tmp_path / "a" / "b" / "result.json"
    write_json(target, {"fid": 0.5, "rows": [1, 2]})
    assert json.loads(target.read_text()) == {"fid": 0.5, "rows": [1, 2]}
    with pytest.raises(TypeError):
        write_json(target, {"bad": object()})  # not serialisable: the old file survives, no temp file is left
    assert json.loads(target.read_text()) == {"fid": 0.5, "rows": [1, 2]}
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]
