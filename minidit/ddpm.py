"""DDPM baseline (Ho et al. 2020; DiT/ADM settings): ε-prediction, linear or cosine betas, ancestral and DDIM sampling.

Integer steps k = 0 … T−1 (k = 0 is the least noisy). The model is called with t = k / T so that the
timestep embedder (which multiplies by 1000) sees k for T = 1000 — the same backbone and the same time
direction as rectified flow (larger t = more noise).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minidit.flow import guided


class DDPMSchedule:
    """β_k for k = 0…T−1 and the derived ᾱ_k = Π_{j≤k} (1 − β_j); 'linear' 1e-4…0.02 (DDPM, DiT) or 'cosine'."""

    def __init__(self, kind: str = "linear", T: int = 1000):
        if T < 2:
            raise ValueError(f"T must be ≥ 2, got {T}")
        if kind == "linear":
            betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
        elif kind == "cosine":  # Nichol & Dhariwal 2021, s = 0.008, betas clipped at 0.999
            s = 0.008
            f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"schedule must be 'linear' or 'cosine', got {kind!r}")
        self.kind, self.T = kind, T
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # ᾱ_k, float64

    def abar(self, k: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_k for integer steps k (B,), shaped to broadcast against `like` (B, ...)."""
        a = self.alphas_cumprod.to(like.device)[k].to(like.dtype)
        return a.reshape(-1, *([1] * (like.ndim - 1)))

    def model_time(self, k: torch.Tensor) -> torch.Tensor:
        """The float time the backbone sees for integer step k: t = k / T."""
        return k.float() / self.T


def q_sample(schedule: DDPMSchedule, x0: torch.Tensor, k: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward noising: x_k = √ᾱ_k · x0 + √(1 − ᾱ_k) · ε."""
    if noise.shape != x0.shape or k.shape != (x0.shape[0],):
        raise ValueError(f"need noise {tuple(x0.shape)} and k ({x0.shape[0]},); "
                         f"got {tuple(noise.shape)}, {tuple(k.shape)}")
    if k.dtype not in (torch.int64, torch.int32) or int(k.min()) < 0 or int(k.max()) >= schedule.T:
        raise ValueError(f"k must be integer steps in [0, {schedule.T - 1}]")
    a = schedule.abar(k, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def predict_x0(x_k: torch.Tensor, eps: torch.Tensor, abar: float) -> torch.Tensor:
    """The clean image the predicted noise implies: x̂0 = (x_k − √(1 − ᾱ_k)·ε̂) / √ᾱ_k (q_sample solved for x0)."""
    if not 0 < abar <= 1:
        raise ValueError(f"abar (ᾱ_k) must be in (0, 1], got {abar}")
    return (x_k - math.sqrt(1 - abar) * eps) / math.sqrt(abar)


def ddpm_loss(
    model: torch.nn.Module,
    schedule: DDPMSchedule,
    x0: torch.Tensor,
    y: torch.Tensor,
    k: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    drop_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """ε-prediction MSE at uniformly drawn integer steps (the 'simple' DDPM loss)."""
    if k is None:
        k = torch.randint(0, schedule.T, (x0.shape[0],), device=x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    x_k = q_sample(schedule, x0, k, noise)
    eps = model(x_k, schedule.model_time(k), y, drop_mask=drop_mask)[:, : x0.shape[1]]
    return F.mse_loss(eps.float(), noise.float())


def respaced_steps(schedule: DDPMSchedule, steps: int) -> list[int]:
    """`steps` integer steps, evenly spaced from T−1 down to 0 (both ends included when steps ≥ 2)."""
    if not isinstance(steps, int) or not 1 <= steps <= schedule.T:
        raise ValueError(f"steps must be an int in [1, {schedule.T}], got {steps!r}")
    ks = torch.linspace(schedule.T - 1, 0, steps).round().long().tolist()
    return sorted(set(ks), reverse=True)


@torch.no_grad()
def ddpm_sample(
    model: torch.nn.Module,
    schedule: DDPMSchedule,
    labels: torch.Tensor,
    steps: int = 250,
    cfg_scale: float = 1.0,
    method: str = "ddim",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    clip_x0: bool = True,
    batch_size: int = 500,
) -> torch.Tensor:
    """Sample with 'ancestral' (DDPM, posterior variance β̃ on the respaced chain) or 'ddim' (η = 0: deterministic).

    NFE = steps. The x0 estimate is clipped to [−1, 1] at each step when `clip_x0` (pixel space, as DDPM does).
    """
    if method not in ("ancestral", "ddim"):
        raise ValueError(f"method must be 'ancestral' or 'ddim', got {method!r}")
    cfg = model.config
    device = next(model.parameters()).device
    shape = (labels.shape[0], cfg.in_channels, cfg.input_size, cfg.input_size)
    if noise is None:
        noise = torch.randn(shape, generator=generator)
    ks = respaced_steps(schedule, steps)
    abar = schedule.alphas_cumprod
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, shape[0], batch_size):
            y = labels[i : i + batch_size].to(device)
            eps_fn = guided(model, y, cfg_scale)
            x = noise[i : i + batch_size].to(device)
            for j, k in enumerate(ks):
                a_t = abar[k].item()
                a_prev = abar[ks[j + 1]].item() if j + 1 < len(ks) else 1.0
                kk = torch.full((x.shape[0],), k, device=device)
                eps = eps_fn(x, schedule.model_time(kk))
                x0 = predict_x0(x, eps, a_t)
                if clip_x0:
                    x0 = x0.clamp(-1, 1)
                    eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)  # keep ε consistent with the clipped x0
                if method == "ddim":
                    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
                else:
                    sigma = math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))  # √β̃ of the respaced chain
                x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
                if sigma > 0 and j + 1 < len(ks):
                    z = torch.randn(x.shape, generator=generator).to(device)
                    x = x + sigma * z
            out.append(x)
    finally:
        model.train(was_training)
    return torch.cat(out)
