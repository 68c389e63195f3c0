"""Text-to-image at toy scale: a caption encoder trained with its backbone — a cross-attention DiT (PixArt-α style)
or SD3's MMDiT.

A caption is an id into the closed caption set of its dataset (`minidit.text.caption_set`); id N is the empty
(null) caption. So `TextToImage(x, t, y)` has the signature of a class-conditional DiT, and the package's Trainer
(caption dropout = label dropout), sampler and guidance (CFG with the null caption) work unchanged. Inside, the
conditioner turns caption ids into token states + a pooled vector (`minidit.text.CaptionEncoder`), and the backbone
takes those embeddings: c = t_emb + MLP(pooled) for adaLN, the tokens for cross-attention or joint attention.
Train one with `minidit t2i --config shapes-mmdit --out …`; evaluate with `minidit.faithfulness`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn

from minidit.data import CaptionedShapes, ShapeSpec
from minidit.mmdit import MMDiT, MMDiTConfig
from minidit.models import DiT, DiTConfig, describe
from minidit.sampling import sample
from minidit.text import CaptionEncoder, caption_set


@dataclass(frozen=True)
class T2IConfig:
    """A text-to-image model: the text encoder, the backbone and its size (saved as JSON with every checkpoint)."""

    backbone: str = "mmdit"  # "dit" = DiT + cross-attention to text (PixArt-α style), "mmdit" = SD3's MMDiT
    caption_set: str = "shapes"  # "shapes" (captioned shapes) or "mnist" ("a handwritten seven")
    input_size: int = 32
    in_channels: int = 3
    patch_size: int = 4
    dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    text_dim: int = 64
    text_depth: int = 2
    text_heads: int = 4
    max_len: int = 16

    def __post_init__(self):
        if self.backbone not in ("dit", "mmdit") or self.caption_set not in ("shapes", "mnist") \
                or self.text_dim % self.text_heads:
            raise ValueError(f"invalid T2IConfig {self}: backbone 'dit' or 'mmdit', caption_set 'shapes' or "
                             "'mnist', text_dim divisible by text_heads")

    def backbone_config(self) -> DiTConfig:
        """The backbone's config: text tokens of width text_dim as context, their mean as the pooled vector."""
        kind = MMDiTConfig if self.backbone == "mmdit" else DiTConfig
        return kind(input_size=self.input_size, in_channels=self.in_channels, patch_size=self.patch_size,
                    dim=self.dim, depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    context_dim=self.text_dim, pooled_dim=self.text_dim, qk_norm=self.qk_norm)

    def to_dict(self) -> dict:
        return asdict(self)


T2I_CONFIGS: dict[str, T2IConfig] = {
    "shapes-dit": T2IConfig(backbone="dit"),
    "shapes-mmdit": T2IConfig(backbone="mmdit"),
    "mnist-dit": T2IConfig(backbone="dit", caption_set="mnist", input_size=28, in_channels=1, patch_size=4),
    "mnist-mmdit": T2IConfig(backbone="mmdit", caption_set="mnist", input_size=28, in_channels=1, patch_size=4),
}


def get_t2i_config(name: str, **overrides) -> T2IConfig:
    """A named text-to-image config, optionally with fields replaced."""
    if name not in T2I_CONFIGS:
        raise ValueError(f"unknown text-to-image config {name!r}; choose one of {sorted(T2I_CONFIGS)}")
    return replace(T2I_CONFIGS[name], **overrides)


class TextToImage(nn.Module):
    """Caption encoder + backbone: forward(x, t, y) with y (B,) caption ids, id `null_label` = "" (no text)."""

    def __init__(self, config: T2IConfig):
        super().__init__()
        self.config = c = config
        self.text = CaptionEncoder(caption_set(c.caption_set), c.text_dim, c.text_depth, c.text_heads, c.max_len)
        self.backbone = MMDiT(c.backbone_config()) if c.backbone == "mmdit" else DiT(c.backbone_config())

    @property
    def null_label(self) -> int:
        return self.text.null_label

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def caption_ids(self, captions: list[str]) -> torch.Tensor:
        """Captions → ids (B,); "" is the null caption."""
        return self.text.ids(captions)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tokens, pooled, mask = self.text(y)  # (B, L, text_dim), (B, text_dim), (B, L)
        return self.backbone(x, t, pooled, tokens, mask)

    def __call__(self, x, t, y) -> torch.Tensor:
        """Checks the caption ids (the backbone checks x and t), then runs `forward`."""
        if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.dtype not in (torch.int64, torch.int32) \
                or (y.numel() and not torch.compiler.is_compiling() and not 0 <= int(y.min()) <= int(y.max())
                    <= self.null_label):
            raise ValueError(f"y must be caption ids (B,) in [0, {self.null_label}] ({self.null_label} = the null "
                             f"caption), got {describe(y)}")
        return super().__call__(x, t, y)


# ---- data --------------------------------------------------------------------------------------------------------
def heldout_captions(fraction: float = 0.1, seed: int = 0) -> set[str]:
    """A fixed random subset of the two-object captions never shown in training (compositional generalisation)."""
    two = [cap for cap in caption_set("shapes") if " and " in cap]
    pick = np.random.default_rng(seed).choice(len(two), size=int(round(fraction * len(two))), replace=False)
    return {two[i] for i in pick}


def shapes_tensors(n: int = 6000, seed: int = 0, exclude: set[str] | None = None, size: int = 32
                   ) -> tuple[torch.Tensor, torch.Tensor, list[list[ShapeSpec]]]:
    """Captioned shapes as tensors: images (N, 3, size, size), caption ids (N,), objects; excluded captions skipped."""
    ds = CaptionedShapes(n=n, seed=seed, size=size)
    index = {cap: i for i, cap in enumerate(caption_set("shapes"))}
    items = [it for it in (ds[i] for i in range(n)) if not exclude or it["caption"] not in exclude]
    return (torch.stack([it["image"] for it in items]), torch.tensor([index[it["caption"]] for it in items]),
            [it["objects"] for it in items])


@torch.no_grad()
def generate(model: TextToImage, captions: list[str], steps: int = 20, cfg_scale: float = 1.0, seed: int = 0,
             sampler: str = "euler") -> torch.Tensor:
    """Images (B, C, H, W) in [−1, 1] for captions, rectified-flow sampling with classifier-free guidance."""
    g = torch.Generator().manual_seed(seed)
    y = model.caption_ids(captions)
    return sample(model, y, steps=steps, cfg_scale=cfg_scale, sampler=sampler, generator=g).clamp(-1, 1).cpu()
