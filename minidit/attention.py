"""Attention: multi-head self- and cross-attention, fast (SDPA) and explicit (returns the weights).

    softmax(q·kᵀ / √d) · v      for q (B, H, T_query, d) and k, v (B, H, T_key, d)

Training uses PyTorch's fused `F.scaled_dot_product_attention` (SDPA), which never materialises the
(T_query × T_key) weight matrix. The explicit path computes the same thing step by step (softmax in fp32) and
also returns the weights (B, H, T_query, T_key); it runs only when asked (`return_weights=True`) or while an
`AttentionRecorder` is attached to the model, so looking at attention maps never slows training down.

Masks: a key padding mask is a bool tensor (B, T_key), True = a real token that may be attended to.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q·kᵀ/√d, masked)·v → (B, H, Tq, d); with `return_weights`, also the weights (B, H, Tq, Tk).

    `mask` is a key padding mask (B, Tk) or any bool mask broadcastable to (B, H, Tq, Tk); True = attend.
    """
    if mask is not None and mask.ndim == 2:
        mask = mask[:, None, None, :]  # (B, 1, 1, Tk)
    if not return_weights:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1).to(q.dtype)
    return weights @ v, weights  # (B, H, Tq, d), (B, H, Tq, Tk)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, H·d) → (B, H, T, d)."""
    B, T, D = x.shape
    return x.reshape(B, T, num_heads, D // num_heads).transpose(1, 2)  # (B, H, T, d)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, d) → (B, T, H·d)."""
    B, H, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, H * d)  # (B, T, D)


class QKNorm(nn.RMSNorm):
    """RMSNorm of each head's q or k (QK-norm, SD3 §5.3.2), its gain cast to the input's dtype (bf16 autocast)."""

    def __init__(self, head_dim: int, eps: float = 1e-6):
        super().__init__(head_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class AttentionModule(nn.Module):
    """Base of the attention layers: `attend` runs SDPA, or the explicit path when weights are wanted or recorded."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_norm = QKNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = QKNorm(self.head_dim) if qk_norm else nn.Identity()
        self.recorder: AttentionRecorder | None = None  # set while an AttentionRecorder is attached

    def attend(self, q, k, v, mask=None, return_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(out (B, H, Tq, d), weights (B, H, Tq, Tk) or None)."""
        if not return_weights and self.recorder is None:
            return attention(q, k, v, mask), None
        out, weights = attention(q, k, v, mask, return_weights=True)
        if self.recorder is not None:
            self.recorder.add(self, weights)
        return out, weights


class Attention(AttentionModule):
    """Multi-head self-attention (DiT / timm layout): fused qkv Linear, optional QK-RMSNorm, output Linear."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__(dim, num_heads, qk_norm)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False):
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)  # (B, T, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, d)
        out, w = self.attend(self.q_norm(q), self.k_norm(k), v, mask, return_weights)
        out = self.proj(merge_heads(out))  # (B, T, D)
        return (out, w) if return_weights else out


class CrossAttention(AttentionModule):
    """Queries from the image tokens (width dim), keys/values from a context of its own width (kdim = vdim)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__(dim, num_heads, qk_norm)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None,
                return_weights: bool = False):
        B, L, _ = context.shape
        q = split_heads(self.q(x), self.num_heads)  # (B, H, T, d)
        kv = self.kv(context).reshape(B, L, 2, self.num_heads, self.head_dim)  # (B, L, 2, H, d)
        k, v = kv.permute(2, 0, 3, 1, 4)  # each (B, H, L, d)
        out, w = self.attend(self.q_norm(q), self.k_norm(k), v, context_mask, return_weights)
        out = self.proj(merge_heads(out))  # (B, T, D)
        return (out, w) if return_weights else out


class AttentionRecorder:
    """Context manager that collects the attention weights of every attention layer of a model.

    While attached, those layers take the explicit path. Each call appends (layer name, weights (B, heads,
    T_query, T_key)) to `records`, in call order; a sampler calls each layer once per step, so the records of
    step s are records[s·L : (s+1)·L] for a model with L recorded layers.
    """

    def __init__(self, model: nn.Module, include: tuple[str, ...] | None = None):
        self.modules = {m: name for name, m in model.named_modules() if isinstance(m, AttentionModule)
                        and (include is None or any(s in name for s in include))}
        if not self.modules:
            raise ValueError("the model has no attention layers to record (or none matches `include`)")
        self.records: list[tuple[str, torch.Tensor]] = []

    def add(self, module: nn.Module, weights: torch.Tensor) -> None:
        self.records.append((self.modules[module], weights.detach().float().cpu()))

    def __enter__(self) -> AttentionRecorder:
        for m in self.modules:
            m.recorder = self
        return self

    def __exit__(self, *exc) -> None:
        for m in self.modules:
            m.recorder = None

    def by_name(self, name: str) -> list[torch.Tensor]:
        """All recorded weights of one layer, in call order."""
        return [w for n, w in self.records if n == name]
