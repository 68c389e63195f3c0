"""Attention: multi-head self- and cross-attention, fast (SDPA) and explicit (returns the weights).

Training always runs `F.scaled_dot_product_attention`. The explicit softmax path computes the same output
and also returns the attention weights (B, heads, T_query, T_key); it runs only when asked
(`return_weights=True`, or while an `AttentionRecorder` is attached, see `minidit.viz`).

Masks: a key padding mask is a bool tensor (B, T_key), True = a real token that may be attended to.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _expand_mask(mask: torch.Tensor | None, B: int, Tk: int) -> torch.Tensor | None:
    """Key padding mask (B, Tk) → broadcastable (B, 1, 1, Tk); 4-D masks pass through."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise ValueError(f"attention mask must be bool (True = attend), got {mask.dtype}")
    if mask.ndim == 2:
        if mask.shape != (B, Tk):
            raise ValueError(f"key padding mask must be (B, T_key) = ({B}, {Tk}), got {tuple(mask.shape)}")
        if not torch.compiler.is_compiling() and not bool(mask.any(dim=1).all()):
            raise ValueError("every sequence needs at least one unmasked key (a row of the mask is all False)")
        return mask[:, None, None, :]  # (B, 1, 1, Tk)
    if mask.ndim == 4:
        return mask
    raise ValueError(f"attention mask must be (B, T_key) or 4-D, got shape {tuple(mask.shape)}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q·kᵀ/√d + mask)·v for q (B, H, Tq, d), k/v (B, H, Tk, d); mask as in `_expand_mask`.

    `return_weights=False` uses SDPA; True uses the explicit path and returns (out, weights (B, H, Tq, Tk)).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be (B, H, T, d), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, _, _, d = q.shape
    m = _expand_mask(mask, B, k.shape[2])
    if not return_weights:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)  # (B, H, Tq, Tk)
    if m is not None:
        scores = scores.masked_fill(~m, float("-inf"))
    weights = scores.float().softmax(dim=-1).to(q.dtype)
    return weights @ v, weights  # (B, H, Tq, d), (B, H, Tq, Tk)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, H·d) → (B, H, T, d)."""
    B, T, D = x.shape
    return x.reshape(B, T, num_heads, D // num_heads).transpose(1, 2)  # (B, H, T, d)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, d) → (B, T, H·d)."""
    B, H, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, H * d)  # (B, T, D)


class _Recordable(nn.Module):
    """Base for attention modules whose weights a recorder can collect (explicit path only while recording)."""

    def __init__(self):
        super().__init__()
        self.recorder = None  # set by minidit.viz.AttentionRecorder

    def _attend(self, q, k, v, mask, return_weights):
        want = return_weights or self.recorder is not None
        if not want:
            return attention(q, k, v, mask), None
        out, w = attention(q, k, v, mask, return_weights=True)
        if self.recorder is not None:
            self.recorder.add(self, w)
        return out, w


class Attention(_Recordable):
    """Multi-head self-attention (DiT / timm layout): fused qkv Linear, optional QK-RMSNorm, output Linear."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False):
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)  # (B, T, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, d)
        q, k = self.q_norm(q), self.k_norm(k)
        out, w = self._attend(q, k, v, mask, return_weights)
        out = self.proj(merge_heads(out))  # (B, T, D)
        return (out, w) if return_weights else out


class CrossAttention(_Recordable):
    """Queries from the image tokens (width dim), keys/values from a context of its own width (kdim = vdim)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.context_dim = num_heads, dim // num_heads, context_dim
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        return_weights: bool = False,
    ):
        if context.ndim != 3 or context.shape[-1] != self.context_dim or context.shape[0] != x.shape[0]:
            raise ValueError(f"context must be (B, L, {self.context_dim}) with B = {x.shape[0]}, "
                             f"got {tuple(context.shape)}")
        B, L, _ = context.shape
        q = split_heads(self.q(x), self.num_heads)  # (B, H, T, d)
        kv = self.kv(context).reshape(B, L, 2, self.num_heads, self.head_dim)  # (B, L, 2, H, d)
        k, v = kv.permute(2, 0, 3, 1, 4)  # each (B, H, L, d)
        q, k = self.q_norm(q), self.k_norm(k)
        out, w = self._attend(q, k, v, context_mask, return_weights)
        out = self.proj(merge_heads(out))  # (B, T, D)
        return (out, w) if return_weights else out
