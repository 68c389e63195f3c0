"""Attention variants DiT and SD3 do not use, measured in lesson 12: GQA, ALiBi-2D, RoPE-2D, windows + global tokens.

- grouped-query attention (`n_kv_heads` < heads): heads share keys/values in groups (fewer k/v weights and cache);
- ALiBi on the 2D distance between patches (`alibi`): no positions in q/k, scores get −slope_h · distance;
- 2D rotary positions (`rope`): the first half of each head rotates with the row, the second with the column;
- tiled attention (`window`): each token attends within its window×window tile; `global_tokens` = g² adds g² pooled
  tokens (keys/values averaged over a g×g partition of the image) that every query also sees. Trained on the
  block-sparse path (tiles as a batch), shown (weights (B, H, T, T + G)) through the equivalent dense mask.
Tokens are in row-major order on an h×w grid, as minidit.tokens.patchify makes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minidit.attention import AttentionModule, merge_heads, split_heads
from minidit.models import DiT, DiTConfig

ALIBI_DISTANCES = ("euclidean", "manhattan")
ROPE_THETA = 100.0  # 2D RoPE base for short axes (RoPE-ViT, Heo et al. 2024); LLMs use 10,000 for long 1D contexts


def grid_positions(h: int, w: int) -> torch.Tensor:
    """(row, column) of each token of an h×w grid in row-major order: (h·w, 2) int64."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=1)  # (T, 2)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's geometric per-head slopes 2^(−8k/H), k = 1…H (Press et al. 2022): (H,)."""
    return 2.0 ** (-8.0 * torch.arange(1, num_heads + 1, dtype=torch.float64) / num_heads)


def alibi_2d_bias(num_heads: int, h: int, w: int, distance: str = "euclidean") -> torch.Tensor:
    """ALiBi adapted to images: score bias −slope_h · dist(patch i, patch j) on the h×w grid, (H, T, T) float32."""
    pos = grid_positions(h, w).double()
    diff = pos[:, None, :] - pos[None, :, :]  # (T, T, 2)
    dist = diff.norm(dim=-1) if distance == "euclidean" else diff.abs().sum(dim=-1)  # (T, T)
    return (-alibi_slopes(num_heads)[:, None, None] * dist).float()  # (H, T, T)


def rope_2d_angles(head_dim: int, h: int, w: int, theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, d/2) of 2D RoPE: channel pairs of the first half of a head rotate with the row,
    those of the second half with the column, at frequencies theta^(−i/(d/4)), i = 0…d/4 − 1."""
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (d/4,)
    pos = grid_positions(h, w).double()
    angles = torch.cat([pos[:, :1] * freqs, pos[:, 1:] * freqs], dim=1)  # (T, d/2): row pairs, column pairs
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (2i, 2i+1) of x (B, H, T, d) by the angle with cos/sin (T, d/2)[:, i]."""
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, H, T, d/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)  # (B, H, T, d)


def window_mask(h: int, w: int, window: int, global_tokens: int = 0) -> torch.Tensor:
    """Tiled attention as a mask (T, T + G): a query sees the keys of its own window×window tile and all G
    global tokens (appended after the T image keys)."""
    tile = grid_positions(h, w) // window  # (T, 2): the tile of each token
    same = (tile[:, None, :] == tile[None, :, :]).all(dim=-1)  # (T, T)
    return torch.cat([same, torch.ones(h * w, global_tokens, dtype=torch.bool)], dim=1)  # (T, T + G)


def pool_tokens(x: torch.Tensor, h: int, w: int, g: int) -> torch.Tensor:
    """Average x (B, H, T, d) over a g×g partition of its h×w grid: the g² global tokens (B, H, g², d)."""
    B, H, _, d = x.shape
    x = x.reshape(B, H, g, h // g, g, w // g, d)  # (B, H, gy, ry, gx, rx, d)
    return x.mean(dim=(3, 5)).reshape(B, H, g * g, d)  # (B, H, G, d)


def to_tiles(x: torch.Tensor, h: int, w: int, window: int) -> torch.Tensor:
    """(B, H, T, d) row-major grid → (B, H, n, window², d), n = (h/window)·(w/window) tiles."""
    B, H, _, d = x.shape
    x = x.reshape(B, H, h // window, window, w // window, window, d).permute(0, 1, 2, 4, 3, 5, 6)  # (B,H,ny,nx,wy,wx,d)
    return x.reshape(B, H, -1, window * window, d)  # (B, H, n, window², d)


def from_tiles(x: torch.Tensor, h: int, w: int, window: int) -> torch.Tensor:
    """The inverse of `to_tiles`: (B, H, n, window², d) → (B, H, T, d)."""
    B, H, _, _, d = x.shape
    x = x.reshape(B, H, h // window, w // window, window, window, d).permute(0, 1, 2, 4, 3, 5, 6)  # (B,H,ny,wy,nx,wx,d)
    return x.reshape(B, H, h * w, d)  # (B, H, T, d)


def check_attention_options(num_heads: int, head_dim: int, grid: tuple[int, int], n_kv_heads: int | None = None,
                            rope: bool = False, alibi: str | None = None, window: int | None = None,
                            global_tokens: int = 0) -> None:
    """ValueError naming the option that does not fit the heads or the token grid."""
    (h, w), g = grid, math.isqrt(global_tokens) if isinstance(global_tokens, int) and global_tokens >= 0 else -1
    problems = {
        "n_kv_heads": n_kv_heads is not None and (not isinstance(n_kv_heads, int) or n_kv_heads < 1
                                                  or num_heads % n_kv_heads),
        "alibi": alibi is not None and alibi not in ALIBI_DISTANCES,
        "rope": bool(rope) and head_dim % 4 != 0,
        "window": window is not None and (not isinstance(window, int) or window < 1 or h % window or w % window
                                          or alibi is not None),
        "global_tokens": g < 0 or (global_tokens > 0 and (not window or g * g != global_tokens or h % g or w % g)),
    }
    bad = [k for k, wrong in problems.items() if wrong]
    if bad:
        raise ValueError(f"invalid attention option(s) {bad} for {num_heads} heads of {head_dim} on a {h}×{w} grid: "
                         f"n_kv_heads must divide the heads, alibi in {ALIBI_DISTANCES}, rope needs head_dim % 4 == 0, "
                         "window must divide the grid (not with alibi), global_tokens = g² with g dividing the grid "
                         "(only with window)")


class VariantAttention(AttentionModule):
    """Multi-head self-attention with the variants of this module on an h×w token grid (all off = DiT's Attention)."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], n_kv_heads: int | None = None,
                 rope: bool = False, alibi: str | None = None, window: int | None = None, global_tokens: int = 0,
                 qk_norm: bool = False):
        super().__init__(dim, num_heads, qk_norm)
        check_attention_options(num_heads, self.head_dim, grid, n_kv_heads, rope, alibi, window, global_tokens)
        self.grid, self.n_kv_heads = grid, n_kv_heads or num_heads
        self.rope, self.alibi, self.window, self.global_tokens = rope, alibi, window, global_tokens
        self.qkv = nn.Linear(dim, dim + 2 * self.n_kv_heads * self.head_dim)
        self.proj = nn.Linear(dim, dim)
        if rope:
            cos, sin = rope_2d_angles(self.head_dim, *grid)
            self.register_buffer("rope_cos", cos, persistent=False)  # (T, d/2)
            self.register_buffer("rope_sin", sin, persistent=False)
        if alibi is not None:
            self.register_buffer("alibi_bias", alibi_2d_bias(num_heads, *grid, alibi), persistent=False)  # (H, T, T)
        if window is not None:
            self.register_buffer("window_mask", window_mask(*grid, window, global_tokens), persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False):
        kv = self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([x.shape[-1], kv, kv], dim=-1)  # (B, T, D), (B, T, Hkv·d) ×2
        q, k, v = split_heads(q, self.num_heads), split_heads(k, self.n_kv_heads), split_heads(v, self.n_kv_heads)
        if self.n_kv_heads != self.num_heads:  # grouped-query attention: each k/v head serves `group` query heads
            group = self.num_heads // self.n_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, T, d)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = apply_rope(q, self.rope_cos, self.rope_sin), apply_rope(k, self.rope_cos, self.rope_sin)
        if self.window is None:  # ALiBi adds a score bias, which `attend` (and its CPU fast path) does not take
            out, w = (self.attend if self.alibi is None else self.alibi_attend)(q, k, v, mask, return_weights)
        else:
            out, w = self.windowed(q, k, v, return_weights)
        out = self.proj(merge_heads(out))  # (B, T, D)
        return (out, w) if return_weights else out

    def alibi_attend(self, q, k, v, mask=None, return_weights: bool = False):
        """AttentionModule.attend with ALiBi's bias added to the scores."""
        bias = self.alibi_bias.to(q.dtype)  # (H, T, T)
        if mask is not None:
            bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))  # (B, H, T, T)
        if not return_weights and self.recorder is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias), None
        weights = ((q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1]) + bias.float()).softmax(-1).to(q.dtype)
        if self.recorder is not None:
            self.recorder.add(self, weights)
        return weights @ v, weights

    def windowed(self, q, k, v, return_weights: bool):
        """Tiled attention (+ pooled global tokens): block-sparse when training, the dense mask when showing."""
        (h, w), win, G = self.grid, self.window, self.global_tokens
        if G:
            g = math.isqrt(G)
            k_g, v_g = pool_tokens(k, h, w, g), pool_tokens(v, h, w, g)  # (B, H, G, d)
        if return_weights or self.recorder is not None:
            if G:
                k, v = torch.cat([k, k_g], dim=2), torch.cat([v, v_g], dim=2)  # (B, H, T + G, d)
            return self.attend(q, k, v, self.window_mask[None, None], return_weights)
        B, H, T, d = q.shape
        qt, kt, vt = (to_tiles(z, h, w, win) for z in (q, k, v))  # (B, H, n, win², d)
        n = qt.shape[2]
        if G:
            kt = torch.cat([kt, k_g[:, :, None].expand(B, H, n, G, d)], dim=3)  # (B, H, n, win² + G, d)
            vt = torch.cat([vt, v_g[:, :, None].expand(B, H, n, G, d)], dim=3)
        out, _ = self.attend(qt.flatten(1, 2), kt.flatten(1, 2), vt.flatten(1, 2))  # (B, H·n, win², d)
        return from_tiles(out.reshape(B, H, n, win * win, d), h, w, win), None


@dataclass(frozen=True)
class VariantConfig(DiTConfig):
    """A DiT whose self-attention uses the variants of this module (all off = DiT)."""

    n_kv_heads: int | None = None
    rope: bool = False
    alibi: str | None = None
    window: int | None = None
    global_tokens: int = 0

    def __post_init__(self):
        super().__post_init__()
        grid = self.input_size // self.patch_size
        check_attention_options(self.num_heads, self.dim // self.num_heads, (grid, grid), self.n_kv_heads, self.rope,
                                self.alibi, self.window, self.global_tokens)


class VariantDiT(DiT):
    """DiT with VariantAttention in every block; with rope or alibi the blocks get relative positions and the
    absolute sin-cos table is not added."""

    def __init__(self, config: VariantConfig):
        super().__init__(config)
        c, grid = config, (config.input_size // config.patch_size,) * 2
        for block in self.blocks:
            block.attn = VariantAttention(c.dim, c.num_heads, grid, c.n_kv_heads, c.rope, c.alibi, c.window,
                                          c.global_tokens, c.qk_norm)
        if c.rope or c.alibi:
            self.pos_embed.zero_()
        self.init_weights()
