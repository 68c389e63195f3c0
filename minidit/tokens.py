"""Patch tokens and 2D sin-cos positions: how an image (or latent) becomes a sequence for a transformer."""

from __future__ import annotations

import torch
from torch import nn


def check_image(x: torch.Tensor, p: int) -> None:
    """ValueError unless x is an image batch (B, C, H, W) whose sides the patch size p divides."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected an image batch (B, C, H, W), got {got}")
    if not isinstance(p, int) or p < 1 or x.shape[-2] % p or x.shape[-1] % p:
        raise ValueError(f"image size {x.shape[-2]}×{x.shape[-1]} is not divisible by patch size {p!r}")


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) → (B, T, p·p·C) with T = (H/p)·(W/p), patches in row-major order, features (p, q, c)."""
    check_image(x, p)
    B, C, H, W = x.shape
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p)  # (B, C, h, p, w, q)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, q, C)
    return x.reshape(B, h * w, p * p * C)  # (B, T, p·p·C)


def unpatchify(tokens: torch.Tensor, p: int, channels: int, h: int | None = None, w: int | None = None) -> torch.Tensor:
    """(B, T, p·p·C) → (B, C, h·p, w·p); the inverse of `patchify`. h, w default to a square grid."""
    B, T, F = tokens.shape
    if h is None and w is None:
        h = w = round(T**0.5)
    if F != p * p * channels or h * w != T:
        raise ValueError(f"tokens {tuple(tokens.shape)} do not form a {h}×{w} grid of {p}×{p}×{channels} patches")
    x = tokens.reshape(B, h, w, p, p, channels)  # (B, h, w, p, q, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, q)
    return x.reshape(B, channels, h * p, w * p)  # (B, C, H, W)


class PatchEmbed(nn.Module):
    """A p×p, stride-p convolution: the same as a Linear layer on `patchify(x, p)` (DiT's x_embedder)."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def init_weights(self) -> None:
        """DiT's: xavier-uniform on the kernel seen as the (D, p·p·C) Linear it is, zero bias."""
        w = self.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # (D, C, p, p) → (D, C·p·p)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, h, w)
        # contiguous: the transposed view would make every LayerNorm of the residual stream copy its input
        return x.flatten(2).transpose(1, 2).contiguous()  # (B, T, D)

    def as_linear_weight(self) -> torch.Tensor:
        """The conv kernel as the (D, p·p·C) matrix that acts on `patchify` features."""
        return self.proj.weight.permute(0, 2, 3, 1).reshape(self.proj.out_channels, -1)  # (D, p, q, C) → (D, F)


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions → (M, dim): [sin(pos·ω_k), cos(pos·ω_k)] with ω_k = 10000^(−k/(dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    out = positions.double().reshape(-1, 1) * omega  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int | None = None, base_size: int | None = None) -> torch.Tensor:
    """2D sin-cos table (grid_h·grid_w, dim), row-major: first dim/2 channels encode the column, the rest the row.

    This is DiT's (MAE's) layout. `base_size` rescales positions to arange(n) · base_size / n, as diffusers
    does for SD3's large table (base_size = sample_size / patch_size); None means plain integer positions.
    """
    grid_w = grid_h if grid_w is None else grid_w
    if dim % 4 or grid_h < 1 or grid_w < 1:
        raise ValueError(f"2D sin-cos positions need dim % 4 == 0 and a grid of at least 1×1, got {dim}, "
                         f"{grid_h}×{grid_w}")
    ys, xs = torch.arange(grid_h, dtype=torch.float32), torch.arange(grid_w, dtype=torch.float32)
    if base_size is not None:
        ys, xs = ys / (grid_h / base_size), xs / (grid_w / base_size)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each
    emb_x = sincos_1d(dim // 2, xx.reshape(-1))  # (h·w, dim/2)
    emb_y = sincos_1d(dim // 2, yy.reshape(-1))  # (h·w, dim/2)
    return torch.cat([emb_x, emb_y], dim=1).float()  # (h·w, dim)


def crop_pos_embed(table: torch.Tensor, max_size: int, h: int, w: int) -> torch.Tensor:
    """Centre h×w crop of a (max_size², D) table (SD3): one table serves every resolution up to max_size."""
    if h > max_size or w > max_size:
        raise ValueError(f"a {h}×{w} token grid does not fit the {max_size}×{max_size} position table")
    top, left = (max_size - h) // 2, (max_size - w) // 2
    grid = table.reshape(max_size, max_size, -1)  # (S, S, D)
    return grid[top : top + h, left : left + w].reshape(h * w, -1)  # (h·w, D)
