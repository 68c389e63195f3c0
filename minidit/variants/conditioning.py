"""The conditioning ablation (DiT §3.2, Table 4): how t and y enter the transformer, five ways.

- "adaln-zero": DiT's block (minidit.models.DiTBlock): (shift, scale, gate) regressed from c = t_emb + y_emb,
  the regression zero-initialised, so every block starts as the identity.
- "adaln-gated": the same block with ordinary (xavier) initialisation: gates, but no "Zero".
- "adaln": plain adaLN, (shift, scale) only — no gates — with ordinary initialisation (DiT's "adaLN" row).
- "cross-attention": a plain ViT block plus cross-attention to the two condition tokens [t_emb, y_emb].
- "in-context": a plain ViT block; t_emb and y_emb are two extra tokens in the sequence, dropped at the end.
Gates and zero-init came together in DiT's adaLN-Zero; "adaln-gated" separates them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minidit.attention import Attention, CrossAttention
from minidit.models import DiT, DiTBlock, DiTConfig, Mlp, modulate, run_block, unpatchify, xavier_init, zero_init

CONDITIONINGS = ("adaln-zero", "adaln-gated", "adaln", "cross-attention", "in-context")


class GatedAdaLNBlock(DiTBlock):
    """DiT's block — (shift, scale, gate) × (attention, MLP) — with every Linear xavier-initialised: no "Zero"."""

    def init_weights(self) -> None:
        xavier_init(self)


class AdaLNBlock(nn.Module):
    """adaLN without gates: (shift, scale) × (attention, MLP) regressed from c, ordinary init."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim))
        self.init_weights()

    def init_weights(self) -> None:
        xavier_init(self)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class InContextBlock(nn.Module):
    """In-context conditioning: a plain pre-LN ViT block; t and y arrive as two extra tokens in the sequence."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))
        self.init_weights()

    def init_weights(self) -> None:
        xavier_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 2 + T, D) = [t token, y token, image tokens]."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossAttentionBlock(InContextBlock):
    """Cross-attention conditioning: self-attention, cross-attention to the 2 tokens [t_emb, y_emb], then MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__(dim, num_heads, mlp_ratio)
        self.norm_cross, self.cross_attn = nn.LayerNorm(dim, eps=1e-6), CrossAttention(dim, dim, num_heads)
        self.init_weights()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) image tokens; cond (B, 2, D) = stack([t_emb, y_emb])."""
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm_cross(x), cond)
        return x + self.mlp(self.norm2(x))


class PlainFinalLayer(nn.Module):
    """The final layer of the non-adaptive variants: affine LayerNorm then a zero-initialised Linear to p·p·C."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.init_weights()

    def init_weights(self) -> None:
        zero_init(self.linear)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(self.norm_final(x))  # (B, T, p·p·C)


@dataclass(frozen=True)
class AblationConfig(DiTConfig):
    """A DiT of the conditioning ablation: DiT's fields plus how t and y enter the blocks (CONDITIONINGS)."""

    conditioning: str = "adaln-zero"

    def __post_init__(self):
        super().__post_init__()
        if self.conditioning not in CONDITIONINGS or self.context_dim is not None or self.pooled_dim is not None \
                or (self.qk_norm and self.conditioning != "adaln-zero"):
            raise ValueError(f"conditioning must be one of {CONDITIONINGS} (class labels only; qk_norm only with "
                             f"adaln-zero), got {self.conditioning!r}")


class AblationDiT(DiT):
    """DiT with the blocks of one conditioning variant; "adaln-zero" is exactly minidit.models.DiT."""

    def __init__(self, config: AblationConfig):
        super().__init__(config)
        c, kind = config, config.conditioning
        if kind in ("adaln-gated", "adaln", "cross-attention", "in-context"):
            block = {"adaln-gated": GatedAdaLNBlock, "adaln": AdaLNBlock, "cross-attention": CrossAttentionBlock,
                     "in-context": InContextBlock}[kind]
            self.blocks = nn.ModuleList(block(c.dim, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        if kind in ("cross-attention", "in-context"):
            self.final_layer = PlainFinalLayer(c.dim, c.patch_size, c.in_channels)
        if kind != "adaln-zero":
            self.init_weights()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, context=None, context_mask=None):
        kind = self.config.conditioning
        x = self.x_embedder(x)  # (B, T, D)
        x = x + self.pos_embed.to(x.dtype)  # the tokens' dtype (bf16 under autocast), not the image's
        t_emb, y_emb = self.t_embedder(t), self.y_embedder(y)  # (B, D) each
        c, cond = t_emb + y_emb, torch.stack([t_emb, y_emb], dim=1)  # (B, D), (B, 2, D)
        if kind == "in-context":
            x = torch.cat([cond.to(x.dtype), x], dim=1)  # (B, 2 + T, D)
        args = () if kind == "in-context" else (cond,) if kind == "cross-attention" else (c,)
        for block in self.blocks:
            x = run_block(self, block, x, *args)  # (B, T, D), checkpointed with grad_checkpointing
        if kind == "in-context":
            x = x[:, 2:]  # (B, T, D): drop the two condition tokens before the final layer
        return unpatchify(self.final_layer(x, c), self.config.patch_size, self.config.in_channels)  # (B, C, H, W)
