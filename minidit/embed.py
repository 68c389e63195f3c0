"""Conditioning embeddings: the diffusion time t and the class label (text embeddings live in `minidit.text`)."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """DiT's sinusoidal features of a (B,) tensor of (already scaled) times → (B, dim): [cos, sin]."""
    if not isinstance(t, torch.Tensor) or t.ndim != 1:
        raise ValueError(f"t must be a 1-D tensor (B,), got {getattr(t, 'shape', type(t).__name__)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2·half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def init_mlp(mlp: nn.Sequential, std: float = 0.02) -> None:
    """DiT's initialisation of its conditioning MLPs: every Linear's weight N(0, std²), bias zero."""
    for lin in mlp:
        if isinstance(lin, nn.Linear):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)


class TimestepEmbedder(nn.Module):
    """t ∈ [0, 1] (0 = data, 1 = noise) → t·1000 → 256 sinusoidal features → Linear–SiLU–Linear."""

    def __init__(self, dim: int, frequency_dim: int = 256, scale: float = 1000.0):
        super().__init__()
        self.frequency_dim, self.scale = frequency_dim, scale
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def init_weights(self) -> None:
        init_mlp(self.mlp)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t * self.scale, self.frequency_dim)  # (B, 256)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class label → vector; row `num_classes` is the null (unconditional) label used for CFG.

    In training mode each label is replaced by the null label with probability `dropout_prob`
    (or where `drop_mask` is True); in eval mode labels are used as given.
    """

    def __init__(self, num_classes: int, dim: int, dropout_prob: float = 0.1):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"dropout_prob must be in [0, 1), got {dropout_prob}")
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor, drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be an integer tensor (B,), got {getattr(labels, 'dtype', type(labels))}"
                             f" of shape {tuple(getattr(labels, 'shape', ()))}")
        if labels.numel() and not torch.compiler.is_compiling():  # (skip the host sync when compiled)
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi > self.num_classes:
                raise ValueError(f"labels must be in [0, {self.num_classes}] ({self.num_classes} = null), "
                                 f"got values in [{lo}, {hi}]")
        if self.training:
            if drop_mask is None and self.dropout_prob > 0:
                drop_mask = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            if drop_mask is not None:
                labels = torch.where(drop_mask, torch.full_like(labels, self.null_label), labels)
        return self.embedding_table(labels)  # (B, D)
