"""Figures: sample grids, loss curves, and recording attention maps from a model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def image_grid(images: torch.Tensor, nrow: int = 10, padding: int = 2) -> torch.Tensor:
    """Images (N, C, H, W) in [−1, 1] → one uint8 grid (H', W', C) via torchvision's make_grid."""
    from torchvision.utils import make_grid

    if images.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
    grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=padding, normalize=True,
                     value_range=(-1, 1), pad_value=1.0)  # (C, H', W') in [0, 1]
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0)  # (H', W', C)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 10, scale: int = 2) -> Path:
    """Write a PNG grid of images in [−1, 1] (each pixel repeated `scale` times for visibility)."""
    from PIL import Image

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
    import matplotlib.pyplot as plt

    grid = image_grid(images, nrow).numpy()
    if ax is None:
        _, ax = plt.subplots(figsize=(min(12, nrow * 0.8), 0.8 * -(-images.shape[0] // nrow) + 0.4))
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
    ax.axis("off")
    if title:
        ax.set_title(title)
    return ax


def plot_loss(history: list[dict], path: str | Path | None = None, title: str = "training loss", smooth: int = 10):
    """Loss curve (raw and moving average) against step; saved to `path` if given. Returns the figure."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

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
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


class AttentionRecorder:
    """Context manager that collects attention weights from every attention module of a model.

    While attached, those modules take the explicit softmax path (training never does). Each call appends
    (module name, weights (B, heads, T_query, T_key)) to `records`, in call order; a sampler calls each
    layer once per step, so records of step s are records[s·L : (s+1)·L] for a model with L recorded layers.
    """

    def __init__(self, model: nn.Module, include: tuple[str, ...] | None = None):
        from minidit.attention import _Recordable

        self.modules = {m: name for name, m in model.named_modules() if isinstance(m, _Recordable)
                        and (include is None or any(s in name for s in include))}
        if not self.modules:
            raise ValueError("the model has no attention modules to record (or none matches `include`)")
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
        """All recorded weights of one module, in call order."""
        return [w for n, w in self.records if n == name]
