"""Compositional scenes for lesson 13: two objects in a spatial relation, or a count, drawn anti-aliased at any
resolution, and their deterministic checker per object, per relation and per count (the GenEval idea).

"a small red circle left of a large blue square", "three large green triangles": 4,392 captions over the captioned
shapes' shapes and colours. A `Scene` is resolution-free (centres in [0, 1]), so its 32-, 64- and 128-pixel renders
agree; `check_scene` reads a generated image with `minidit.faithfulness.classify_pixels`.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from minidit.data import COLOURS, SHAPES, object_mask, to_model_range
from minidit.faithfulness import MIN_IOU, PALETTE, PALETTE_TOL, classify_pixels
from minidit.text import PAD, START

# ---- the scenes ----
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}  # (axis, sign of a − b)
COUNTS = {"two": 2, "three": 3}
SCENE_SIZES = {"small": 0.14, "large": 0.21}  # half-width as a fraction of the canvas side


@dataclass(frozen=True)
class Scene:
    """What a caption asks for — objects (shape, colour, size), and object 0's relation to object 1 or else a count
    of identical objects — and, once laid out, each object's centre (x, y) in [0, 1] canvas units."""

    objects: tuple[tuple[str, str, str], ...]
    relation: str | None = None
    centres: tuple[tuple[float, float], ...] = ()

    @property
    def caption(self) -> str:
        """'a small red circle left of a large blue square' or 'three large green triangles'."""
        (s1, c1, z1), (s2, c2, z2) = self.objects[:2]
        if self.relation is None:
            return f"{next(w for w, n in COUNTS.items() if n == len(self.objects))} {z1} {c1} {s1}s"
        return f"a {z1} {c1} {s1} {self.relation} a {z2} {c2} {s2}"


@functools.lru_cache(maxsize=1)
def scene_requests() -> tuple[Scene, ...]:
    """Every request of the scenes grammar (4,392, no centres), in a fixed order: the 72 counts, then relations."""
    objs = [(s, c, z) for s in SHAPES for c in COLOURS for z in SCENE_SIZES]
    counts = [Scene((o,) * n) for n in COUNTS.values() for o in objs]
    return (*counts, *(Scene((a, b), rel) for a in objs for b in objs if a[1] != b[1] for rel in RELATIONS))


def sample_scene(rng: np.random.Generator) -> Scene:
    """A count (1 in 4) or two objects of different colours in a relation — object 0 in the half the relation
    names, object 1 in the other, anywhere along the other axis — laid out so that no two objects overlap."""
    requests, counts = scene_requests(), 2 * len(SHAPES) * len(COLOURS) * len(SCENE_SIZES)
    request = requests[int(rng.integers(counts) if rng.random() < 0.25 else rng.integers(counts, len(requests)))]
    r = [SCENE_SIZES[z] for _, _, z in request.objects]
    while True:  # rejection sampling
        xy = rng.uniform(0.23, 0.77, (len(r), 2))  # every object fits inside the canvas
        if request.relation is not None:
            axis, sign = RELATIONS[request.relation]
            xy[:, axis] = 0.5 + np.array([sign, -sign]) * rng.uniform(0.08, 0.27, 2)
        if min(np.abs(xy[a] - xy[b]).max() - r[a] - r[b] for a in range(len(r)) for b in range(a)) > 0.04:
            return replace(request, centres=tuple((float(x), float(y)) for x, y in xy))


def render_scene(scene: Scene, size: int = 64, supersample: int = 4) -> np.ndarray:
    """A laid-out scene drawn at size×size (uint8 (size, size, 3)), anti-aliased: a pixel averages supersample²
    sub-pixels. The same scene at any resolution."""
    big = size * supersample
    cover = np.zeros((len(scene.objects), big, big), dtype=np.float32)
    for k, ((shape, _, z), (x, y)) in enumerate(zip(scene.objects, scene.centres)):
        r = SCENE_SIZES[z] * big
        x0, y0, m = int(x * big - r) - 1, int(y * big - r) - 1, int(2 * r) + 3  # the object's box (inside the canvas)
        cover[k, y0 : y0 + m, x0 : x0 + m] = object_mask(shape, x * big - x0, y * big - y0, r, m)
    cover = cover.reshape(-1, size, supersample, size, supersample).mean((2, 4))  # (n, size, size) coverage
    rgb = np.array([COLOURS[c] for _, c, _ in scene.objects], dtype=np.float32)  # (n, 3); objects never overlap
    return np.einsum("nhw,nc->hwc", cover, rgb).round().astype(np.uint8)


# ---- the checker ----
SCENE_CHECKS = ("colour", "shape", "size", "relation", "count", "all")
MIN_AREA = 0.01  # a blob covers ≥ 1 % of the canvas (a small triangle: 2.9 %)


def blobs(mask: torch.Tensor) -> list[torch.Tensor]:
    """The 8-connected components of a bool mask (H, W) covering ≥ MIN_AREA of it, largest first (bool masks)."""
    H, W = mask.shape
    ids = torch.where(mask, torch.arange(1, H * W + 1, dtype=torch.float32).view(H, W), 0.0)[None, None]
    while True:  # every pixel takes its neighbourhood's largest id until each component holds one id
        new = torch.where(mask, F.max_pool2d(ids, 3, 1, 1), 0.0)
        if torch.equal(new, ids):
            break
        ids = new
    found = [ids[0, 0] == v for v in ids.unique()[1:]]
    return sorted([m for m in found if m.sum() >= MIN_AREA * H * W], key=lambda m: -int(m.sum()))


def shape_and_size(blob: torch.Tensor, colour: str) -> tuple[str, str] | None:
    """The (shape, size) whose mask best overlaps a blob of `colour` (IoU ≥ MIN_IOU), centred on the blob's bounding
    box ±½ pixel; the masks shrink by the anti-aliased rim that `classify_pixels` does not count as the colour."""
    n, rim = blob.shape[-1], 0.5 - PALETTE_TOL / float(np.linalg.norm(COLOURS[colour]))
    ys, xs = torch.nonzero(blob, as_tuple=True)
    cx, cy = float(xs.min() + xs.max() + 1) / 2, float(ys.min() + ys.max() + 1) / 2
    m = int(2 * max(SCENE_SIZES.values()) * n) + 4  # a window around the blob that holds every template
    x0, y0 = int(cx) - m // 2, int(cy) - m // 2
    window = F.pad(blob, (m, m, m, m))[y0 + m : y0 + 2 * m, x0 + m : x0 + 2 * m]  # (m, m), zeros outside the image
    best, name = MIN_IOU, None
    for shape, (size, r), dx, dy in itertools.product(SHAPES, SCENE_SIZES.items(), (-.5, 0, .5), (-.5, 0, .5)):
        t = torch.from_numpy(object_mask(shape, cx - x0 + dx, cy - y0 + dy, r * n - rim, m))
        inter = float((t & window).sum())
        iou = inter / (float(t.sum()) + len(xs) - inter)
        best, name = (iou, (shape, size)) if iou > best else (best, name)
    return name


def check_scene(labels: torch.Tensor, scene: Scene) -> dict[str, bool | None]:
    """A palette-index map (H, W) (`classify_pixels`) against a scene's request: colour (each object found: a blob of
    its colour), shape, size, relation (None for a count: the first object's centroid lies left of / right of / above
    / below the second's), count (None for a relation: the number of blobs of the colour) and "all" of them."""
    if scene.relation is None:  # every blob of the colour is one of the counted objects
        found = blobs(labels == PALETTE.index(scene.objects[0][1]))
        wanted = [(*scene.objects[0], m) for m in found] or [(*scene.objects[0], None)]
    else:  # each object is the largest blob of its colour
        wanted = [(s, c, z, next(iter(blobs(labels == PALETTE.index(c))), None)) for s, c, z in scene.objects]
    names = [shape_and_size(m, c) if m is not None else None for _, c, _, m in wanted]
    out = {"colour": all(m is not None for *_, m in wanted),
           "shape": all(n is not None and n[0] == s for n, (s, *_) in zip(names, wanted)),
           "size": all(n is not None and n[1] == z for n, (_, _, z, _) in zip(names, wanted)),
           "relation": None, "count": None}
    if scene.relation is None:
        out["count"] = len(found) == len(scene.objects)
    else:
        axis, sign = RELATIONS[scene.relation]
        a, b = (float(torch.nonzero(m)[:, 1 - axis].float().mean()) if m is not None else 0.0 for *_, m in wanted)
        out["relation"] = out["colour"] and sign * (a - b) > 0
    out["all"] = all(v for v in out.values() if v is not None)
    return out


def scene_faithfulness(images: torch.Tensor, scenes: list[Scene]) -> dict[str, float]:
    """Accuracy of each check over the images (relation: over relation captions only; count: over counts only)."""
    if images.ndim != 4 or len(scenes) != images.shape[0]:
        raise ValueError(f"need images (B, 3, H, W) and B scenes, got {tuple(images.shape)} and {len(scenes)}")
    labels = torch.cat([classify_pixels(images[i : i + 50]) for i in range(0, len(scenes), 50)])  # (B, H, W)
    results = [check_scene(lab, sc) for lab, sc in zip(labels, scenes)]
    return {k: sum(v) / len(v) for k in SCENE_CHECKS if (v := [r[k] for r in results if r[k] is not None])}


def scene_features(images: torch.Tensor, cells: int = 4) -> torch.Tensor:
    """(N, 8·cells²) features for a Fréchet distance between scene images: the share of each palette class (black,
    six colours, unclear) in each cell of a cells×cells grid — colours, where they are, how clean the pixels are."""
    onehot = F.one_hot(classify_pixels(images), len(PALETTE) + 1).permute(0, 3, 1, 2).float()  # (N, 8, H, W)
    return F.adaptive_avg_pool2d(onehot, cells).flatten(1).double()  # (N, 8·cells²)


def scene_captions() -> list[str]:
    """The scenes' captions (4,392) in `scene_requests` order; index = caption id."""
    return [scene.caption for scene in scene_requests()]


def scene_vocabulary() -> list[str]:
    """The scenes' own word list for minidit.text.Tokenizer (the shipped text models keep the course vocabulary)."""
    return [PAD, START, *sorted({w for cap in scene_captions() for w in cap.split()})]


def scenes_tensors(n: int, seed: int = 0, size: int = 64) -> tuple[torch.Tensor, torch.Tensor, list[Scene]]:
    """n scenes (scene i from a generator seeded with (seed, i)) rendered at size: images (N, 3, size, size) in
    [−1, 1], caption ids (N,) into `scene_captions()`, and the scenes (ground truth)."""
    scenes = [sample_scene(np.random.default_rng([seed, i])) for i in range(n)]
    index = {cap: i for i, cap in enumerate(scene_captions())}
    images = torch.stack([to_model_range(render_scene(s, size)).permute(2, 0, 1) for s in scenes])  # (N, 3, size, size)
    return images, torch.tensor([index[s.caption] for s in scenes]), scenes
