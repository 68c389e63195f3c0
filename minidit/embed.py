"""Conditioning embeddings: the diffusion time t, the class label, and a pooled vector (e.g. of a caption)."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """DiT's sinusoidal features of a (B,) tensor of (already scaled) times → (B, dim): [cos, sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2·half)


class MlpEmbedder(nn.Module):
    """Linear–SiLU–Linear from `in_dim` features to the model width (DiT's conditioning MLP; SD3's pooled text)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def init_weights(self) -> None:
        """DiT's initialisation of its conditioning MLPs: weights N(0, 0.02²), biases zero."""
        for lin in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.to(self.mlp[0].weight.dtype))  # (B, D)


class TimestepEmbedder(MlpEmbedder):
    """t ∈ [0, 1] (0 = data, 1 = noise) → t·1000 → 256 sinusoidal features → Linear–SiLU–Linear."""

    def __init__(self, dim: int, frequency_dim: int = 256, scale: float = 1000.0):
        super().__init__(frequency_dim, dim)
        self.frequency_dim, self.scale = frequency_dim, scale

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return super().forward(timestep_embedding(t * self.scale, self.frequency_dim))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class label → vector; row `num_classes` is the null ("no label") label that classifier-free guidance uses.

    DiT drops labels inside this module; here the training objective replaces them with the null label before the
    call (`minidit.guidance.drop_labels`), so that which labels are dropped is reproducible.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def init_weights(self) -> None:
        nn.init.normal_(self.embedding_table.weight, std=0.02)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)  # (B, D)
