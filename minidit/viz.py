"""Figures: sample grids, loss curves, attention maps drawn over images."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import torch
from PIL import Image
from torchvision.utils import make_grid


def image_grid(images: torch.Tensor, nrow: int = 10, padding: int = 2) -> torch.Tensor:
    """Images (N, C, H, W) in [−1, 1] → one uint8 grid (H', W', C) via torchvision's make_grid."""
    if images.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
    grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=padding, normalize=True,
                     value_range=(-1, 1), pad_value=1.0)  # (C, H', W') in [0, 1]
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0)  # (H', W', C)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 10, scale: int = 2) -> Path:
    """Write a PNG grid of images in [−1, 1] (each pixel repeated `scale` times for visibility)."""
    grid = image_grid(images, nrow).numpy()
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def show_grid(images: torch.Tensor, nrow: int = 10, title: str | None = None, ax=None):
    """Draw an image grid with matplotlib (for notebooks); returns the axes."""
    grid = image_grid(images, nrow).numpy()
    if ax is None:
        _, ax = plt.subplots(figsize=(min(12, nrow * 0.8), 0.8 * -(-images.shape[0] // nrow) + 0.4))
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
    ax.axis("off")
    if title:
        ax.set_title(title)
    return ax


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure to `path` (folders created) and close it, freeing its memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_loss(history: list[dict], path: str | Path | None = None, title: str = "training loss", smooth: int = 10):
    """Loss curve (raw and moving average) against step; saved to `path` if given. Returns the figure."""
    if not history:
        raise ValueError("empty training history: nothing to plot")
    steps = [h["step"] for h in history]
    loss = torch.tensor([h["loss"] for h in history])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, alpha=0.35, label="loss")
    if len(loss) >= smooth:
        avg = torch.nn.functional.avg_pool1d(loss[None, None], smooth, 1).squeeze()
        ax.plot(steps[smooth - 1 :], avg, label=f"moving average ({smooth} points)")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


# ---- attention maps over images (text-to-image) ----------------------------------------------------------------
def upsample_map(word_map: torch.Tensor, size: int) -> torch.Tensor:
    """A token map (T,) or (h, w) over a square patch grid → (size, size), each patch's value spread over its pixels."""
    if word_map.ndim == 1:
        side = int(round(word_map.numel() ** 0.5))
        if side * side != word_map.numel():
            raise ValueError(f"a flat map needs a square number of tokens, got {word_map.numel()}")
        word_map = word_map.reshape(side, side)
    if word_map.ndim != 2 or size % word_map.shape[0] or size % word_map.shape[1]:
        raise ValueError(f"map {tuple(word_map.shape)} does not tile a {size}×{size} image")
    up = torch.nn.functional.interpolate(word_map[None, None].float(), size=(size, size), mode="nearest")
    return up[0, 0]


def overlay_attention(image: torch.Tensor, word_map: torch.Tensor, ax=None, title: str | None = None,
                      alpha: float = 0.55, vmax: float | None = None):
    """Draw an image (C, H, W) in [−1, 1] with a word's attention map (T,) on top as a heat map; returns the axes."""
    if image.ndim != 3:
        raise ValueError(f"expected one image (C, H, W), got {tuple(image.shape)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(2, 2))
    img = ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()  # (H, W, C) in [0, 1]
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
    heat = upsample_map(word_map.detach().float().cpu(), image.shape[-1]).numpy()
    ax.imshow(heat, cmap="inferno", alpha=alpha, vmin=0, vmax=float(heat.max()) if vmax is None else vmax)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)
    return ax


def show_attention_grid(images: torch.Tensor, maps: torch.Tensor, row_titles: list[str] | None = None,
                        col_titles: list[str] | None = None, cell: float = 1.6, alpha: float = 0.55):
    """A grid of overlays: maps (R, C, T) over images (C, ch, H, W) (one image per column) or (ch, H, W) (the same
    image everywhere). E.g. rows = layers, columns = sampling steps. Each map is scaled to its own maximum."""
    if maps.ndim != 3:
        raise ValueError(f"maps must be (rows, cols, T), got {tuple(maps.shape)}")
    R, C, _ = maps.shape
    if images.ndim == 3:
        images = images.unsqueeze(0).expand(C, *images.shape)
    if images.shape[0] != C:
        raise ValueError(f"need one image per column ({C}), got {images.shape[0]}")
    fig, axes = plt.subplots(R, C, figsize=(cell * C, cell * R), squeeze=False)
    for r in range(R):
        for c in range(C):
            overlay_attention(images[c], maps[r, c], ax=axes[r, c], alpha=alpha)
            if r == 0 and col_titles:
                axes[r, c].set_title(col_titles[c], fontsize=8)
        if row_titles:
            axes[r, 0].text(-0.08, 0.5, row_titles[r], transform=axes[r, 0].transAxes, ha="right", va="center",
                            fontsize=8)
    fig.tight_layout()
    return fig
