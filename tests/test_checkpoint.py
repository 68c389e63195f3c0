import json
import pickle
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minidit import checkpoint as ck
from minidit.checkpoint import MODEL_CLASSES, build_config, load_model, save_model, weights_path
from minidit.mmdit import MMDiTConfig
from minidit.models import DiT, DiTConfig, get_config
from minidit.t2i import T2IConfig, TextToImage
from minidit.train import TrainConfig, Trainer
from minidit.vae import VAEConfig


def randomised_dit(name="mnist-tiny"):
    model = DiT(get_config(name))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def test_roundtrip_with_json_beside(tmp_path):
    path = tmp_path / "a.safetensors"
    ck.save_checkpoint(path, {"w": torch.arange(6.0).reshape(2, 3)}, {"kind": "test", "note": "hi"})
    tensors, meta = ck.load_checkpoint(path, kind="test")
    assert torch.equal(tensors["w"], torch.arange(6.0).reshape(2, 3))
    assert meta["note"] == "hi" and meta["format"] == "minidit-checkpoint" and meta["version"] == ck.VERSION == 2
    assert json.loads((tmp_path / "a.json").read_text()) == meta == ck.read_meta(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.safetensors"]


def test_other_versions_are_refused(tmp_path):
    path = tmp_path / "v1.safetensors"
    meta = json.dumps({"format": ck.FORMAT, "version": 1, "kind": "model"})
    save_file({"w": torch.ones(1)}, str(path), metadata={ck.FORMAT: meta})
    with pytest.raises(ck.CheckpointError, match="has checkpoint version 1, this minidit reads 2"):
        ck.read_meta(path)


def test_model_roundtrip(tmp_path):
    model = randomised_dit()
    save_model(tmp_path / "m.safetensors", model, step=7)
    meta = ck.read_meta(tmp_path / "m.safetensors")
    assert meta["kind"] == "model" and meta["model"] == "DiT" and meta["step"] == 7
    assert meta["config"] == model.config.to_dict()
    loaded = load_model(tmp_path / "m.safetensors")
    assert not loaded.training and next(loaded.parameters()).dtype == torch.float32
    x, t, y = torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([1, 2])
    assert torch.equal(model.eval()(x, t, y), loaded(x, t, y))


def test_half_model_roundtrip(tmp_path):
    """save_model(half=True): fp16 tensors on disk (half the bytes), an fp32 model back, outputs to fp16 precision."""
    model = randomised_dit("mnist-p7").eval()
    full, half = tmp_path / "f.safetensors", tmp_path / "h.safetensors"
    save_model(full, model)
    save_model(half, model, half=True)
    assert all(v.dtype == torch.float16 for v in load_file(str(half)).values())
    assert half.stat().st_size < 0.55 * full.stat().st_size
    loaded = load_model(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a.half().float(), b), k  # exactly the fp16-rounded weights
    x, t, y = torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([1, 2])
    out, want = loaded(x, t, y), model(x, t, y)
    assert want.abs().max() > 0.1 and torch.allclose(out, want, atol=1e-2 * want.abs().max().item())


def test_every_model_class_round_trips(tmp_path):
    assert set(MODEL_CLASSES) == {"DiT", "MMDiT", "TextToImage"}
    model = TextToImage(T2IConfig(backbone="dit", dim=32, depth=1, num_heads=2, text_dim=16, text_depth=1,
                                  text_heads=2))
    save_model(tmp_path / "t.safetensors", model, half=True)
    loaded = load_model(tmp_path / "t.safetensors")
    assert isinstance(loaded, TextToImage) and loaded.config == model.config


def test_load_model_from_a_train_state_ema_or_raw(tmp_path):
    from minidit.data import mnist_tensors

    x, y = mnist_tensors("test")
    tr = Trainer(DiT(get_config("mnist-tiny")), x[:32], y[:32], TrainConfig(steps=2, batch_size=16, ema_decay=0.5))
    tr.run(progress=False, checkpoint_path=tmp_path / "s.safetensors")
    ema, raw = load_model(tmp_path / "s.safetensors"), load_model(tmp_path / "s.safetensors", use_ema=False)
    for (k, a), b in zip(ema.state_dict().items(), tr.ema.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(torch.equal(a, c) for a, c in zip(raw.state_dict().values(), tr.model.state_dict().values()))
    assert any(not torch.equal(a, c) for a, c in zip(ema.state_dict().values(), raw.state_dict().values()))


def test_load_model_with_extra_classes(tmp_path):
    class Wide(DiT):
        """A model class the package does not know by name."""

    model = Wide(get_config("mnist-tiny"))
    save_model(tmp_path / "w.safetensors", model)
    with pytest.raises(ck.CheckpointError, match=r"of 'Wide', not one of the models \['DiT', 'MMDiT', 'TextToImage'\]"):
        load_model(tmp_path / "w.safetensors")
    loaded = load_model(tmp_path / "w.safetensors", classes={"Wide": (Wide, DiTConfig)})
    assert type(loaded) is Wide and "Wide" not in MODEL_CLASSES  # the registry itself is not changed


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
    path.write_bytes(data[:5])  # not even the header length
    with pytest.raises(ck.CheckpointError, match="truncated or corrupted"):
        ck.load_checkpoint(path)


def test_foreign_pickle_and_missing_checkpoints(tmp_path):
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
    for missing in (tmp_path / "missing.safetensors", tmp_path):  # nothing there, or a folder
        with pytest.raises(ck.CheckpointError, match="no checkpoint at"):
            ck.read_meta(missing)


def test_wrong_kind_and_mismatched_weights(tmp_path):
    path = tmp_path / "x.safetensors"
    ck.save_checkpoint(path, {"w": torch.ones(1)}, {"kind": "classifier"})
    with pytest.raises(ck.CheckpointError, match="expected 'train-state'"):
        ck.load_checkpoint(path, kind="train-state")
    with pytest.raises(ck.CheckpointError, match="holds a 'classifier' checkpoint"):
        load_model(path)
    model = DiT(get_config("mnist-tiny"))
    state = model.state_dict()
    state["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    del state["final_layer.linear.bias"]
    state["extra"] = torch.ones(1)
    ck.save_checkpoint(path, state, {"kind": "model", "model": "DiT", "config": model.config.to_dict()})
    with pytest.raises(ck.CheckpointError, match=r"do not match its config: missing \['final_layer.linear.bias'\], "
                                                  r"unexpected \['extra'\], shape mismatches \['blocks.0.attn.qkv"):
        load_model(path)


def test_load_state_casts_to_the_modules_dtype():
    src = torch.nn.Linear(3, 2)
    dst = torch.nn.Linear(3, 2).double()
    ck.load_state(dst, {"p." + k: v.half() for k, v in src.state_dict().items()}, prefix="p.")
    assert dst.weight.dtype == torch.float64 and torch.equal(dst.weight, src.weight.half().double())


def test_path_must_be_safetensors_and_meta_needs_a_kind(tmp_path):
    with pytest.raises(ValueError, match=".safetensors"):
        ck.save_checkpoint(tmp_path / "a.pt", {}, {"kind": "x"})
    with pytest.raises(ValueError, match="'kind'"):
        ck.save_checkpoint(tmp_path / "a.safetensors", {}, {"note": "x"})


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


@pytest.mark.parametrize("cls", [DiTConfig, MMDiTConfig, T2IConfig, TrainConfig, VAEConfig])
def test_every_config_round_trips_and_build_config_rejects_bad_fields(cls):
    cfg = cls()
    d = json.loads(json.dumps(asdict(cfg)))
    assert build_config(cls, d) == cfg
    with pytest.raises(ck.CheckpointError, match=f"not a valid {cls.__name__}: .*'bogus'"):
        build_config(cls, {**d, "bogus": 1})


@pytest.mark.parametrize("cls,field,value", [(DiTConfig, "patch_size", 3), (MMDiTConfig, "context_dim", None),
                                             (T2IConfig, "backbone", "unet"), (TrainConfig, "lr", -1.0),
                                             (VAEConfig, "factor", 3)])
def test_build_config_turns_invalid_values_into_checkpoint_errors(cls, field, value):
    with pytest.raises(ck.CheckpointError, match=f"not a valid {cls.__name__}: .*{field}"):
        build_config(cls, {**asdict(cls()), field: value})


def test_removed_config_fields_are_checkpoint_errors(tmp_path):
    """A checkpoint written for a config field that no longer exists fails with a clear error, not a TypeError."""
    model = DiT(get_config("mnist-tiny"))
    path = tmp_path / "old.safetensors"
    ck.save_checkpoint(path, model.state_dict(), {"kind": "model", "model": "DiT",
                                                  "config": {**model.config.to_dict(), "learn_sigma": True}})
    with pytest.raises(ck.CheckpointError, match="not a valid DiTConfig.*learn_sigma"):
        load_model(path)


@pytest.mark.parametrize("name", ["mnist_dit", "shapes_dit", "shapes_mmdit"])
def test_shipped_models_load_at_version_2(name):
    meta = ck.read_meta(weights_path(name))
    assert meta["version"] == 2 and meta["kind"] == "model"
    model = load_model(weights_path(name))
    assert type(model).__name__ == meta["model"] and model.config == build_config(type(model.config), meta["config"])


def test_write_json_creates_folders_and_never_leaves_half_a_file(tmp_path):
    target = tmp_path / "a" / "b" / "result.json"
    ck.write_json(target, {"fid": 0.5, "rows": [1, 2]})
    assert json.loads(target.read_text()) == {"fid": 0.5, "rows": [1, 2]}
    with pytest.raises(TypeError):
        ck.write_json(target, {"bad": object()})  # not serialisable: the old file survives, no temp file is left
    assert json.loads(target.read_text()) == {"fid": 0.5, "rows": [1, 2]}
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]
