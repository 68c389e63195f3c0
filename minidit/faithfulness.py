"""Caption faithfulness of text-to-image samples: a deterministic checker of the captioned-shapes ground truth.

The generator of the data knows what every caption asks for , so a generated image can be scored per
attribute — colour in the requested region, position, shape, size — without a learned judge.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from minidit.data import COLOURS, POSITIONS, SHAPES, SIZES, ShapeSpec, object_mask, objects_of
from minidit.t2i import TextToImage, generate, heldout_captions
from minidit.text import caption_set

# Each pixel gets the nearest palette colour (black = background) if it is within PALETTE_TOL of it, else "unclear".
# For each requested object, within its window (the columns an object at that position can cover):
#   colour   — the requested colour is the most frequent non-background colour and covers MIN..MAX pixels;
#   position — the requested colour's pixels (whole image) have their centroid within POSITION_TOL of the target x;
#   shape, size — the window's dominant colour blob best matches (IoU ≥ MIN_IOU) a template of that shape and size,
#                 searched within ±SHIFT pixels of the requested centre.
# An image passes an attribute when every requested object passes it; "all" = every attribute.
PALETTE = ["black", *COLOURS]  # index 0 = background; index len(PALETTE) = unclear
_PALETTE_RGB = torch.tensor([(0, 0, 0), *COLOURS.values()], dtype=torch.float32)  # (7, 3)
PALETTE_TOL = 80.0  # RGB distance (0–255 units); the closest two palette colours are 106 apart
MIN_PIXELS = 20  # a small triangle covers ~50 pixels on a 32×32 canvas
MAX_PIXELS = 300  # 1.5 × a large circle (~200 pixels): a colour flooding the window is not an object
MIN_IOU = 0.5
POSITION_TOL = 4.0  # pixels (objects sit 8 pixels apart)
SHIFT = 3  # template search ±3 pixels around the requested centre
ATTRIBUTES = ("colour", "position", "shape", "size", "all")


def classify_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [−1, 1] → palette index per pixel (B, H, W): 0 = black, len(PALETTE) = unclear."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images (B, 3, H, W), got {tuple(images.shape)}")
    rgb = (images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5  # (B, 3, H, W) in [0, 255]
    d = ((rgb.permute(0, 2, 3, 1)[..., None, :] - _PALETTE_RGB) ** 2).sum(-1)  # (B, H, W, 7)
    dist, idx = d.min(-1)
    return torch.where(dist.sqrt() <= PALETTE_TOL, idx, len(PALETTE))


def object_window(position: str, size: int) -> tuple[int, int]:
    """Columns [lo, hi) where an object at `position` must lie (±8 pixels on a 32 canvas: the largest half-width)."""
    cx, half = POSITIONS[position] * size / 32, SIZES["large"] * size / 32
    return max(0, int(round(cx - half))), min(size, int(round(cx + half)))


@functools.lru_cache(maxsize=16)
def _templates(size: int, position: str) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """Every (shape, size) mask centred within ±SHIFT pixels of `position`, clipped to its window: (K, H·W) float,
    their areas (K,) and (shape, size) labels."""
    scale, cx, cy = size / 32, POSITIONS[position] * size / 32, size / 2
    lo, hi = object_window(position, size)
    masks, labels = [], []
    for shape in SHAPES:
        for sz, r in SIZES.items():
            for dx in range(-SHIFT, SHIFT + 1):
                for dy in range(-SHIFT, SHIFT + 1):
                    m = object_mask(shape, cx + dx, cy + dy, round(r * scale), size)
                    m[:, :lo] = m[:, hi:] = False
                    masks.append(torch.from_numpy(m).flatten())
                    labels.append((shape, sz))
    masks = torch.stack(masks).float()
    return masks, masks.sum(1), labels


def check_object(labels: torch.Tensor, obj: ShapeSpec) -> dict[str, bool]:
    """Judge one requested object in a palette-index map (H, W): colour, position, shape, size (each True/False)."""
    size = labels.shape[-1]
    area = (size / 32) ** 2  # pixel counts scale with the canvas
    lo, hi = object_window(obj.position, size)
    win = labels[:, lo:hi]
    counts = torch.bincount(win.flatten(), minlength=len(PALETTE) + 1)[: len(PALETTE)]  # drop "unclear"
    counts[0] = 0  # background
    want = PALETTE.index(obj.colour)
    dominant = int(counts.argmax())
    colour_ok = dominant == want and MIN_PIXELS * area <= counts[want] <= MAX_PIXELS * area
    ys, xs = torch.nonzero(labels == want, as_tuple=True)
    cx = POSITIONS[obj.position] * size / 32
    position_ok = MIN_PIXELS * area <= len(xs) <= MAX_PIXELS * area \
        and abs(float(xs.float().mean()) + 0.5 - cx) <= POSITION_TOL * size / 32
    shape_ok = size_ok = False
    if counts[dominant] >= MIN_PIXELS * area:
        mask = torch.zeros(size, size)
        mask[:, lo:hi] = (win == dominant).float()  # the window's main object, whatever its colour
        templates, areas, names = _templates(size, obj.position)  # (K, H·W), (K,)
        inter = templates @ mask.flatten()  # (K,)
        iou = inter / (areas + mask.sum() - inter)
        best = int(iou.argmax())
        if iou[best] >= MIN_IOU:
            shape, sz = names[best]
            shape_ok, size_ok = shape == obj.shape, sz == obj.size
    return {"colour": bool(colour_ok), "position": bool(position_ok), "shape": shape_ok, "size": size_ok}


def check_image(image: torch.Tensor, objects: list[ShapeSpec]) -> dict[str, bool]:
    """One image (3, H, W) vs its requested objects: an attribute passes when it passes for every object."""
    labels = classify_pixels(image[None])[0]
    per_obj = [check_object(labels, o) for o in objects]
    out = {a: all(r[a] for r in per_obj) for a in ATTRIBUTES[:-1]}
    out["all"] = all(out.values())
    return out


def faithfulness(images: torch.Tensor, objects: list[list[ShapeSpec]]) -> dict[str, float]:
    """Accuracy per attribute (colour, position, shape, size, all) of images against the captions' objects."""
    if images.ndim != 4 or len(objects) != images.shape[0]:
        raise ValueError(f"need images (B, 3, H, W) and B object lists, got {tuple(images.shape)} and {len(objects)}")
    results = [check_image(img, objs) for img, objs in zip(images, objects)]
    return {a: sum(r[a] for r in results) / len(results) for a in ATTRIBUTES}


def evaluation_captions(n_seen: int = 100, n_heldout: int = 54, seed: int = 0) -> dict[str, list[str]]:
    """A fixed sample of captions seen in training and of held-out two-object combinations (`heldout_captions`)."""
    held = sorted(heldout_captions(0.1))
    seen = [c for c in caption_set("shapes") if c not in set(held)]
    if not 0 < n_seen <= len(seen) or not 0 < n_heldout <= len(held):
        raise ValueError(f"need 0 < n_seen ≤ {len(seen)} and 0 < n_heldout ≤ {len(held)}, got {n_seen}, {n_heldout}")
    rng = np.random.default_rng(seed)
    return {"seen": [seen[i] for i in rng.choice(len(seen), n_seen, replace=False)],
            "heldout": [held[i] for i in rng.choice(len(held), n_heldout, replace=False)]}


def faithfulness_report(
    model: TextToImage, captions: dict[str, list[str]], scales: tuple[float, ...] = (1.0, 3.0), steps: int = 20,
    seed: int = 1,
) -> dict:
    """{split: {"cfg_<s>": per-attribute accuracy}} for generated samples of each caption list and CFG scale."""
    out = {}
    for split, caps in captions.items():
        objs = [objects_of(c) for c in caps]
        out[split] = {f"cfg_{s:g}": {k: round(v, 4) for k, v in
                                     faithfulness(generate(model, caps, steps, s, seed), objs).items()}
                      for s in scales}
    return out
