"""Offline evaluation: a small MNIST classifier (shipped), conditional accuracy, feature-FID with its floor, KID,
and k-NN precision/recall — all in the classifier's penultimate (128-d) feature space.

Inception-FID needs downloaded weights, so the course measures FID in features of its own classifier
("feature-FID"). Its absolute value is not comparable with published FIDs; compare it with the
real-vs-real floor at the same N (`fid_floor`): real held-out digits vs N real training digits.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minidit.checkpoint import load_checkpoint, load_state, save_checkpoint, weights_path
from minidit.data import mnist_tensors

FEATURE_DIM = 128


class MnistClassifier(nn.Module):
    """Five 3×3 conv layers (BatchNorm, ReLU, two 2×2 max-pools) → global average pool (128-d features) → 10 logits."""

    def __init__(self):
        super().__init__()

        def conv(i, o):
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        self.body = nn.Sequential(
            *conv(1, 32), *conv(32, 32), nn.MaxPool2d(2),  # 28 → 14
            *conv(32, 64), *conv(64, 64), nn.MaxPool2d(2),  # 14 → 7
            *conv(64, FEATURE_DIM), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, 128)
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 28, 28):
            raise ValueError(f"the MNIST classifier takes images (B, 1, 28, 28) in [-1, 1], got {tuple(x.shape)}")
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def random_affine(x: torch.Tensor, u: torch.Tensor, degrees: float = 10.0, translate: float = 0.1,
                  scale: tuple[float, float] = (0.9, 1.1)) -> torch.Tensor:
    """Rotate, scale and shift each image by an amount set by its uniform draws u (B, 4) in [0, 1) (augmentation)."""
    ang = (u[:, 0] * 2 - 1) * degrees * torch.pi / 180
    s = scale[0] + u[:, 1] * (scale[1] - scale[0])
    tx, ty = (u[:, 2:].T * 2 - 1) * translate * 2  # grid units: [-1, 1] spans the image
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1  # pad with background (−1)


def save_classifier(path: str | Path, model: MnistClassifier, info: dict) -> None:
    save_checkpoint(path, {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()},
                    {"kind": "classifier", "model": "MnistClassifier", **info})


@functools.lru_cache(maxsize=4)
def load_classifier(path: str | Path | None = None) -> MnistClassifier:
    """The evaluation classifier (default: the shipped one; weights stored in fp16, run in fp32), cached per path."""
    tensors, _ = load_checkpoint(path or weights_path("mnist_classifier"), kind="classifier")
    model = MnistClassifier()
    load_state(model, tensors, what="classifier")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def _batched(fn, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch].float().cpu()) for i in range(0, x.shape[0], batch)])


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(f"expected MNIST-shaped images (N, 1, 28, 28) in [-1, 1], got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or Inf (did sampling diverge?)")


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of a classifier."""
    _check_images(images)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
    was = model.training
    model.eval()
    pred = _batched(model, images).argmax(1)
    model.train(was)
    return float((pred == labels.cpu()).float().mean())


def features(images: torch.Tensor, classifier: MnistClassifier | None = None) -> torch.Tensor:
    """(N, 128) penultimate features of images clamped to [−1, 1]."""
    _check_images(images)
    clf = classifier or load_classifier()
    return _batched(clf.features, images.clamp(-1, 1)).double()


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) between two feature sets (N, d), computed in float64."""
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(f1.shape[0], f2.shape[0]) < 2:
        raise ValueError(f"need two feature sets (N ≥ 2, d) of equal d, got {tuple(f1.shape)} and {tuple(f2.shape)}")
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    ev, U = torch.linalg.eigh(s1)
    sqrt_s1 = U @ torch.diag(ev.clamp(min=0).sqrt()) @ U.T
    mid = sqrt_s1 @ s2 @ sqrt_s1  # symmetric PSD, same eigenvalues as Σ1Σ2
    tr_sqrt = torch.linalg.eigvalsh(mid).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt)


def kid(f1: torch.Tensor, f2: torch.Tensor, subsets: int = 10, subset_size: int = 500, seed: int = 0) -> float:
    """Kernel Inception Distance: unbiased MMD² with kernel (x·y/d + 1)³, averaged over random subsets."""
    n = min(subset_size, f1.shape[0], f2.shape[0])
    if n < 2:
        raise ValueError("KID needs at least 2 samples per set")
    d = f1.shape[1]
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        a = f1[torch.randperm(f1.shape[0], generator=g)[:n]].double()
        b = f2[torch.randperm(f2.shape[0], generator=g)[:n]].double()
        kxx, kyy, kxy = (a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3
        mmd = ((kxx.sum() - kxx.diag().sum()) + (kyy.sum() - kyy.diag().sum())) / (n * (n - 1)) - 2 * kxy.mean()
        vals.append(float(mmd))
    return sum(vals) / len(vals)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """k-NN precision (fakes inside the real manifold) and recall (reals inside the fake one); Kynkäänniemi 2019."""

    def radii(f):
        d = torch.cdist(f, f)
        return d.kthvalue(k + 1, dim=1).values  # k-th neighbour, skipping self

    r_real, r_fake = radii(real), radii(fake)
    d = torch.cdist(fake, real)  # (Nf, Nr)
    precision = (d <= r_real[None]).any(1).double().mean()
    recall = (d.T <= r_fake[None]).any(1).double().mean()
    return float(precision), float(recall)


TRAIN_SPLIT_OF = {"test": "train", "val": "fit"}  # the reference split → the real digits its floor draws from


@functools.lru_cache(maxsize=2)
def reference_features(split: str = "test") -> torch.Tensor:
    """Classifier features of the reference digits: the 1,000 held-out "test" digits, or the 500 "val" digits."""
    if split not in TRAIN_SPLIT_OF:
        raise ValueError(f"reference must be 'test' (reported figures) or 'val' (choosing settings), got {split!r}")
    return features(mnist_tensors(split)[0])


def stratified_real(n: int, seed: int = 0, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """n real digits of a training split, as class-balanced as possible (n/10 per class), picked with a fixed seed."""
    x, y = mnist_tensors(split)
    if not 10 <= n <= x.shape[0]:
        raise ValueError(f"n must be between 10 and {x.shape[0]}, got {n}")
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in range(10):
        cls = torch.nonzero(y == c).squeeze(1)
        idx.append(cls[torch.randperm(cls.shape[0], generator=g)[: n // 10 + (1 if c < n % 10 else 0)]])
    idx = torch.cat(idx)
    return x[idx], y[idx]


@functools.lru_cache(maxsize=16)
def fid_floor(n: int = 1000, seed: int = 0, reference: str = "test") -> float:
    """Real-vs-real feature-FID: n real training digits vs the reference digits (the best a model can expect)."""
    real = stratified_real(min(n, len(mnist_tensors(TRAIN_SPLIT_OF[reference])[1])), seed, TRAIN_SPLIT_OF[reference])
    return frechet_distance(features(real[0]), reference_features(reference))


def evaluate(images: torch.Tensor, labels: torch.Tensor, reference: str = "test") -> dict:
    """Metrics for class-conditional samples (N, 1, 28, 28) generated for `labels` (N,):

    conditional_accuracy, fid (vs the reference digits), fid_floor (same N), fid_ratio, kid, precision, recall.
    reference="test" (the 1,000 held-out digits) for reported figures; "val" (500 digits) to choose settings,
    with models trained on the "fit" split (minidit.data.split_indices).
    """
    _check_images(images)
    clf = load_classifier()
    feats = features(images, clf)
    pred = clf.head(feats.float()).argmax(1)
    ref = reference_features(reference)
    n = images.shape[0]
    fid, floor = frechet_distance(feats, ref), fid_floor(max(n, 10), reference=reference)
    precision, recall = precision_recall(ref, feats)
    return {"n": n, "conditional_accuracy": float((pred == labels.cpu()).float().mean()), "fid": fid,
            "fid_floor": floor, "fid_ratio": fid / floor, "kid": kid(feats, ref), "precision": precision,
            "recall": recall}
