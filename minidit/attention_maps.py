"""Attention maps of text-to-image models: record image→word attention, and measure what it shows.

Recording goes through `minidit.attention.AttentionRecorder` (the explicit softmax path only while recording; training
stays on SDPA). Measured: a word's attention on the object it names (vs background and vs the other object), map
entropy and self-attention distance by layer and by sampling step, and whether CFG changes attention weights.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from minidit.attention import AttentionRecorder
from minidit.data import CaptionedShapes, ShapeSpec, objects_of
from minidit.faithfulness import MIN_PIXELS, PALETTE, classify_pixels, faithfulness, object_window
from minidit.flow import euler_sample, interpolate
from minidit.guidance import guided
from minidit.t2i import TextToImage


def text_attention_modules(model: TextToImage) -> tuple[str, ...]:
    """The `AttentionRecorder(include=…)` filter for the backbone's image↔text attention (not the text encoder's)."""
    return ("cross_attn",) if model.config.backbone == "dit" else ("backbone.blocks",)


def image_to_text(weights: torch.Tensor, backbone: str, num_text: int, renormalize: bool = True) -> torch.Tensor:
    """Recorded weights → the image→text block (B, H, T_img, L).

    Cross-attention weights are (B, H, T_img, L) already (each row sums to 1 over the words). MMDiT's joint weights
    (B, H, L+T, L+T) have text first: image queries are rows [L:], text keys columns [:L]. Those rows also spend
    mass on image keys, and how much differs between object and background tokens; `renormalize` divides each row
    by its text mass, so both backbones' maps mean "the share of this image token's text attention on each word".
    """
    if backbone == "dit":
        return weights
    block = weights[:, :, num_text:, :num_text]
    return block / block.sum(-1, keepdim=True).clamp_min(1e-12) if renormalize else block


def record_text_maps(model: TextToImage, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One forward at (x_t, t) with an attention recorder: image→text maps (depth, B, H, T_img, L)."""
    model.eval()
    with torch.no_grad(), AttentionRecorder(model, include=text_attention_modules(model)) as rec:
        model(x_t, t, y)
    L = model.config.max_len
    return torch.stack([image_to_text(w, model.config.backbone, L) for _, w in rec.records])


def token_index(caption: str, obj_index: int, attribute: str) -> int:
    """Position (with <start> at 0) of object `obj_index`'s `attribute` word ('size', 'colour', 'shape') in caption."""
    parts = caption.split(" and ")
    offset = 1 + sum(len(p.split()) + 1 for p in parts[:obj_index])  # +1 for each "and"
    return offset + {"size": 1, "colour": 2, "shape": 3}[attribute]


def patch_fraction(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """A pixel mask (H, W) → the fraction of each patch it covers, flattened row-major (T,)."""
    return F.avg_pool2d(mask[None, None].float(), patch).flatten()


def attention_ratio(word_map: torch.Tensor, inside: torch.Tensor) -> float:
    """mean attention on patches inside the object ÷ mean on patches fully outside it (> 1: the word finds it)."""
    fin, fout = inside >= 0.5, inside == 0
    if not fin.any() or not fout.any():
        raise ValueError("the object covers no patch, or every patch: the ratio is undefined")
    return float(word_map[fin].mean() / word_map[fout].mean().clamp_min(1e-12))


def map_entropy(word_map: torch.Tensor) -> float:
    """Entropy of a map normalised over the image tokens, divided by log(T): 1 = uniform, 0 = one token."""
    p = word_map / word_map.sum().clamp_min(1e-12)
    return float(-(p * p.clamp_min(1e-12).log()).sum() / math.log(p.numel()))


@torch.no_grad()
def object_attention_ratio(
    model: TextToImage,
    n: int = 64,
    t_values: tuple[float, ...] = (0.25, 0.5, 0.75),
    seed: int = 123,
    words: tuple[str, ...] = ("colour", "shape"),
) -> dict:
    """For real captioned-shapes images noised to each t: how much more a colour/shape word attends to its object.

    Per (image, object, word), with the word's map averaged over heads (and reported per layer):
    - `ratio`: mean map on the named object's patches ÷ mean on the patches it does not touch (`attention_ratio`);
    - `vs_other`: for two-object captions, mean map on the named object ÷ mean map on the OTHER object — the control
      for "attention simply goes to objects" (1 = the word cannot tell its object from the other one).
    Reports geometric means, the fraction above 1, and per layer / per t. Masks come from `CaptionedShapes`.
    """
    if model.config.caption_set != "shapes":
        raise ValueError("object_attention_ratio needs a model trained on captioned shapes")
    p = model.config.patch_size
    ds = CaptionedShapes(n=n, seed=seed, size=model.config.input_size)
    items = [ds[i] for i in range(n)]
    device = next(model.parameters()).device
    x0 = torch.stack([it["image"] for it in items])
    y = model.caption_ids([it["caption"] for it in items])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    rows: dict[str, dict[str, list]] = {w: {"ratio": [], "vs_other": []} for w in words}  # (t, layer, log value)
    for tv in t_values:
        t = torch.full((n,), tv)
        x_t = interpolate(x0, noise, t).to(device)
        maps = record_text_maps(model, x_t, t.to(device), y).mean(2)  # (depth, B, T, L) on the CPU
        for b, it in enumerate(items):
            fracs = [patch_fraction(m, p) for m in it["masks"]]
            for j, inside in enumerate(fracs):
                if not (inside >= 0.5).any():
                    continue  # an object smaller than half a patch: no patch is "on" it
                for w in words:
                    k = token_index(it["caption"], j, w)
                    for layer in range(maps.shape[0]):
                        wm = maps[layer, b, :, k]
                        rows[w]["ratio"].append((tv, layer, math.log(attention_ratio(wm, inside))))
                        if len(fracs) == 2 and (fracs[1 - j] >= 0.5).any():
                            other = wm[fracs[1 - j] >= 0.5].mean()
                            rows[w]["vs_other"].append((tv, layer, math.log(wm[inside >= 0.5].mean() / other)))
    out = {}
    for w, kinds in rows.items():
        out[w] = {}
        for kind, vals in kinds.items():
            a = np.array(vals).reshape(-1, 3)
            if not len(a):
                continue
            out[w][kind] = {
                "geo_mean": float(np.exp(a[:, 2].mean())),
                "fraction_above_1": float((a[:, 2] > 0).mean()),
                "per_layer": {int(li): float(np.exp(a[a[:, 1] == li, 2].mean())) for li in np.unique(a[:, 1])},
                "per_t": {float(tv): float(np.exp(a[a[:, 0] == tv, 2].mean())) for tv in t_values},
                "count": len(a),
            }
    return out


@torch.no_grad()
def sample_with_attention(
    model: TextToImage, captions: list[str], steps: int = 20, cfg_scale: float = 1.0, seed: int = 0
) -> dict:
    """Euler sampling (as `generate`) that records every backbone attention of the conditional branch, per step.

    Returns {"images" (B, C, H, W), "t" (steps,), "x0_pred" (steps, B, C, H, W): x̂0 = x_t − t·v at each step,
    "text" (steps, depth, B, heads, T_img, L): image→text maps, "self" (steps, depth, B, heads, T_img, T_img):
    image→image weights (DiT self-attention; MMDiT: the image block of the joint matrix)}.
    """
    model.eval()
    cfg, B = model.config, len(captions)
    y = model.caption_ids(captions)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((B, cfg.in_channels, cfg.input_size, cfg.input_size), generator=g).to(y.device)
    v_fn = guided(model, y, cfg_scale)
    preds, ts = [], []

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = v_fn(x, t)
        preds.append((x - t.view(-1, 1, 1, 1) * out).clamp(-1, 1).cpu())
        ts.append(float(t[0]))
        return out

    with AttentionRecorder(model, include=("backbone.blocks",)) as rec:
        images = euler_sample(v, noise, steps).clamp(-1, 1)
    L = cfg.max_len
    text, self_ = [], []
    for name, w in rec.records:
        w = w[:B]  # under CFG the batch is [conditional; unconditional]
        if cfg.backbone == "dit":
            (text if name.endswith("cross_attn") else self_).append(w)
        else:
            text.append(image_to_text(w, "mmdit", L))
            self_.append(w[:, :, L:, L:])
    depth = cfg.depth
    return {
        "images": images.cpu(),
        "t": torch.tensor(ts),
        "x0_pred": torch.stack(preds),
        "text": torch.stack(text).reshape(steps, depth, *text[0].shape),
        "self": torch.stack(self_).reshape(steps, depth, *self_[0].shape),
    }


def mean_attention_distance(weights: torch.Tensor) -> torch.Tensor:
    """Image→image weights (..., T, T) on a square patch grid → mean query-to-key distance in patches (...,).

    Rows are renormalised first (MMDiT's image rows also spend mass on text keys). Small = local attention.
    """
    T = weights.shape[-1]
    side = int(round(T**0.5))
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], 1).float()  # (T, 2)
    dist = torch.cdist(pos, pos)  # (T, T)
    w = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
    return (w * dist).sum(-1).mean(-1)  # mean over queries


def generated_object_masks(images: torch.Tensor, objects: list[list[ShapeSpec]]) -> list[list[torch.Tensor | None]]:
    """Pixel masks of the requested objects in generated images: the requested colour within the object's window
    (None where fewer than MIN_PIXELS such pixels exist, i.e. the object was not drawn)."""
    labels = classify_pixels(images)
    out = []
    for lab, objs in zip(labels, objects):
        row = []
        for o in objs:
            lo, hi = object_window(o.position, lab.shape[-1])
            m = torch.zeros_like(lab, dtype=torch.bool)
            m[:, lo:hi] = lab[:, lo:hi] == PALETTE.index(o.colour)
            row.append(m if int(m.sum()) >= MIN_PIXELS else None)
        out.append(row)
    return out


@torch.no_grad()
def attention_statistics(
    model: TextToImage, captions: list[str], steps: int = 20, cfg_scale: float = 1.0, seed: int = 0
) -> dict:
    """The seed's "early layers = structure, later layers = detail", measured by layer and by sampling step.

    Per (step, layer): the entropy of colour/shape word maps (1 = uniform), their object ratio on the objects the
    model finally drew, and the mean image self-attention distance in patches; per step: faithfulness of x̂0.
    """
    out = sample_with_attention(model, captions, steps, cfg_scale, seed)
    objects = [objects_of(c) for c in captions]
    masks = generated_object_masks(out["images"], objects)
    text = out["text"].mean(3)  # (steps, depth, B, T, L): mean over heads
    S, D = text.shape[:2]
    entropy, ratio = torch.zeros(S, D), torch.zeros(S, D)
    for s in range(S):
        for d in range(D):
            ents, logs = [], []
            for b, cap in enumerate(captions):
                for j, _ in enumerate(objects[b]):
                    for word in ("colour", "shape"):
                        wm = text[s, d, b, :, token_index(cap, j, word)]
                        ents.append(map_entropy(wm))
                        if masks[b][j] is not None:
                            inside = patch_fraction(masks[b][j], model.config.patch_size)
                            if (inside >= 0.5).any() and (inside == 0).any():
                                logs.append(math.log(attention_ratio(wm, inside)))
            entropy[s, d] = float(np.mean(ents))
            ratio[s, d] = float(np.exp(np.mean(logs))) if logs else float("nan")
    distance = mean_attention_distance(out["self"]).mean(-1).mean(-1)  # (steps, depth): over heads and batch
    x0_faith = [faithfulness(out["x0_pred"][s], objects) for s in range(S)]
    return {"t": out["t"].tolist(), "entropy": entropy.tolist(), "ratio": ratio.tolist(),
            "self_distance": distance.tolist(), "x0_faithfulness": x0_faith,
            "final_faithfulness": faithfulness(out["images"], objects)}


@torch.no_grad()
def cfg_attention_check(
    model: TextToImage, captions: list[str], t: float = 0.6, scales: tuple[float, ...] = (1.0, 3.0, 7.0), seed: int = 0
) -> dict:
    """Does CFG change attention? At one fixed input x_t, record the conditional branch's attention for each scale.

    CFG mixes two outputs (v = v_u + s·(v_c − v_u)); the weights of the conditional branch are computed from the same
    (x_t, t, caption) whatever s is. Returns the largest attention-weight difference to s = 1 (expected: float
    round-off) and the largest velocity difference (expected: large), per scale.
    """
    model.eval()
    cfg, B = model.config, len(captions)
    y = model.caption_ids(captions)
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn((B, cfg.in_channels, cfg.input_size, cfg.input_size), generator=g).to(y.device)
    tt = torch.full((B,), t, device=y.device)
    weights, vels = {}, {}
    for s in scales:
        with AttentionRecorder(model, include=("backbone.blocks",)) as rec:
            vels[s] = guided(model, y, s)(x_t, tt)
        weights[s] = [w[:B] for _, w in rec.records]  # conditional half
    base = scales[0]
    return {
        str(s): {
            "max_attention_change": max(float((a - b).abs().max()) for a, b in zip(weights[s], weights[base])),
            "max_velocity_change": float((vels[s] - vels[base]).abs().max()),
        }
        for s in scales
    }
