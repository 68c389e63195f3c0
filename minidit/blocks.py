"""Transformer blocks: DiT's adaLN-Zero block (optionally with cross-attention) and the final layer."""

from __future__ import annotations

import torch
from torch import nn

from minidit.attention import Attention, CrossAttention


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x·(1 + scale) + shift, with (B, D) shift/scale broadcast over the T tokens of x (B, T, D)."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))  # shift + x·(1 + scale), one pass over x


def gated_add(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The adaLN-Zero residual x + gate·y, with a (B, D) gate broadcast over the T tokens (one pass over x and y)."""
    return torch.addcmul(x, gate.unsqueeze(1), y)


class Mlp(nn.Module):
    """Linear → tanh-GELU → Linear (DiT's feed-forward, hidden = mlp_ratio · dim)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _xavier_linears(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class DiTBlock(nn.Module):
    """adaLN-Zero block: (shift, scale, gate) × (attention, MLP) regressed from c; zero-init ⇒ identity at start.

    With `context_dim`, a cross-attention sublayer to a token sequence (e.g. text) sits between
    self-attention and the MLP (PixArt-α style); its output projection is zero-initialised too.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        context_dim: int | None = None,
        qk_norm: bool = False,
        attn_options: dict | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        # attn_options: attention variant keyword arguments of Attention (n_kv_heads, grid, rope, alibi, window, …)
        self.attn = Attention(dim, num_heads, qkv_bias=True, qk_norm=qk_norm, **(attn_options or {}))
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.cross_attn = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.cross_attn = CrossAttention(dim, context_dim, num_heads, qk_norm=qk_norm)
        self.init_weights()

    def init_weights(self) -> None:
        """Xavier for every Linear, then zero the adaLN regression (and the cross-attention output)."""
        _xavier_linears(self)
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)
        if self.cross_attn is not None:
            nn.init.zeros_(self.cross_attn.proj.weight)
            nn.init.zeros_(self.cross_attn.proj.bias)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, D) image tokens, c (B, D) conditioning vector, context (B, L, context_dim) tokens."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = gated_add(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this block has cross-attention: pass context (B, L, context_dim)")
            x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        x = gated_add(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then Linear to p·p·C per token; all zero-init, so a fresh DiT outputs exactly 0."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.init_weights()

    def init_weights(self) -> None:
        for lin in (self.linear, self.adaLN_modulation[-1]):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p·p·C)


# ---- conditioning variants for the ablation (DiT §3.2, Table 4); the adaLN-Zero variant is DiTBlock ------------
class InContextBlock(nn.Module):
    """In-context conditioning: a plain pre-LN ViT block; t and y arrive as two extra tokens in the sequence."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.init_weights()

    def init_weights(self) -> None:
        _xavier_linears(self)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, 2 + T, D) = [t token, y token, image tokens]; c and context are unused (same call as DiTBlock)."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossAttentionBlock(nn.Module):
    """Cross-attention conditioning: self-attention, then cross-attention to the 2 tokens [t_emb, y_emb], then MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, dim, num_heads)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.init_weights()

    def init_weights(self) -> None:
        _xavier_linears(self)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) image tokens; context (B, 2, D) = stack([t_emb, y_emb]); c is unused."""
        if context is None:
            raise ValueError("CrossAttentionBlock needs context (B, L, D): the condition tokens [t_emb, y_emb]")
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context, context_mask)
        return x + self.mlp(self.norm3(x))


class AdaLNBlock(nn.Module):
    """adaLN without the "Zero": (shift, scale) × (attention, MLP) regressed from c, no gates, ordinary init."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim))
        self.init_weights()

    def init_weights(self) -> None:
        """Xavier for every Linear, adaLN included: nothing is zeroed, so a fresh block is not the identity."""
        _xavier_linears(self)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) image tokens, c (B, D) = t_emb + y_emb; context is unused."""
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class PlainFinalLayer(nn.Module):
    """The final layer of the non-adaptive variants: affine LayerNorm then a zero-initialised Linear to p·p·C."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(self.norm_final(x))  # (B, T, p·p·C)


# conditioning name → block class (DiTConfig.conditioning); adaLN-Zero is the package's DiTBlock
CONDITIONING_BLOCKS: dict[str, type[nn.Module]] = {
    "adaln-zero": DiTBlock,
    "adaln": AdaLNBlock,
    "cross-attention": CrossAttentionBlock,
    "in-context": InContextBlock,
}
