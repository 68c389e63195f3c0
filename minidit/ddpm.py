"""DDPM baseline (Ho et al. 2020; DiT/ADM settings): ε- or v-prediction, linear or cosine betas, ancestral and DDIM
sampling, and the min-SNR-γ loss weighting.

Integer steps k = 0 … T−1 (k = 0 is the least noisy). The model is called with t = k / T so that the
timestep embedder (which multiplies by 1000) sees k for T = 1000 — the same backbone and the same time
direction as rectified flow (larger t = more noise).

    forward:    x_k = √ᾱ_k · x0 + √(1 − ᾱ_k) · ε                     ᾱ_k = Π_{j≤k} (1 − β_j)
    x̂0 from ε̂:  x̂0 = (x_k − √(1 − ᾱ_k) · ε̂) / √ᾱ_k
    v-target:   v = √ᾱ_k · ε − √(1 − ᾱ_k) · x0   (Salimans & Ho 2022), so x̂0 = √ᾱ_k·x_k − √(1 − ᾱ_k)·v̂ and
                ε̂ = √(1 − ᾱ_k)·x_k + √ᾱ_k·v̂ (exact: √ᾱ² + √(1 − ᾱ)² = 1)
    min-SNR-γ:  per-sample weight min(SNR, γ)/SNR on the ε-loss, min(SNR, γ)/(SNR + 1) on the v-loss (Hang et al.
                2023), SNR = ᾱ_k/(1 − ᾱ_k); either way the error of x̂0 is weighted by min(SNR, γ)
    DDIM (η):   x_prev = √ᾱ_prev · x̂0 + √(1 − ᾱ_prev − σ²) · ε̂ + σ·z,
                σ = η·√((1 − ᾱ_prev)/(1 − ᾱ_k) · (1 − ᾱ_k/ᾱ_prev))
    ancestral:  the same update with η = 1 (σ² = β̃, the posterior variance of the respaced chain)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

PREDICTIONS = ("eps", "v")  # what the network outputs: the noise ε, or v = √ᾱ·ε − √(1 − ᾱ)·x0


class DDPMSchedule:
    """β_k for k = 0…T−1 and the derived ᾱ_k = Π_{j≤k} (1 − β_j); 'linear' 1e-4…0.02 (DDPM, DiT) or 'cosine'."""

    def __init__(self, kind: str = "linear", T: int = 1000):
        if kind == "linear":
            betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
        elif kind == "cosine":  # Nichol & Dhariwal 2021, s = 0.008, betas clipped at 0.999
            f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"schedule must be 'linear' or 'cosine', got {kind!r}")
        self.kind, self.T, self.betas = kind, T, betas
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # ᾱ_k, float64

    def abar(self, k: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_k for integer steps k (B,), in `like`'s dtype and device, shaped to broadcast against it (B, 1, …)."""
        a = self.alphas_cumprod.to(like.device)[k].to(like.dtype)
        return a.reshape(-1, *([1] * (like.ndim - 1)))

    def model_time(self, k: torch.Tensor) -> torch.Tensor:
        """The float time the backbone sees for integer step k: t = k / T."""
        return k.float() / self.T


def q_sample(schedule: DDPMSchedule, x0: torch.Tensor, k: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward noising: x_k = √ᾱ_k · x0 + √(1 − ᾱ_k) · ε."""
    a = schedule.abar(k, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def predict_x0(x_k: torch.Tensor, eps: torch.Tensor, abar: float) -> torch.Tensor:
    """The clean image the predicted noise implies: x̂0 = (x_k − √(1 − ᾱ_k)·ε̂) / √ᾱ_k (q_sample solved for x0)."""
    return (x_k - math.sqrt(1 - abar) * eps) / math.sqrt(abar)


def v_target(x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """v-prediction's target v = √ᾱ·ε − √(1 − ᾱ)·x0, with ᾱ broadcastable to x0 (e.g. DDPMSchedule.abar)."""
    return abar.sqrt() * noise - (1 - abar).sqrt() * x0


def eps_and_x0(x_k: torch.Tensor, out: torch.Tensor, abar: float, prediction: str = "eps"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε̂, x̂0) from the network's output at x_k: out is ε̂ (prediction 'eps') or v̂ (prediction 'v')."""
    if prediction == "eps":
        return out, predict_x0(x_k, out, abar)
    if prediction == "v":
        a, b = math.sqrt(abar), math.sqrt(1 - abar)
        return b * x_k + a * out, a * x_k - b * out
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def ddpm_loss(model: torch.nn.Module, schedule: DDPMSchedule, x0: torch.Tensor, y: torch.Tensor,
              k: torch.Tensor | None = None, noise: torch.Tensor | None = None, prediction: str = "eps",
              min_snr_gamma: float | None = None) -> torch.Tensor:
    """MSE to the ε-target (the 'simple' DDPM loss) or the v-target, at uniformly drawn integer steps.

    min_snr_gamma: weight each sample's MSE by min(SNR, γ)/SNR (ε) or min(SNR, γ)/(SNR + 1) (v) — Hang et al. 2023
    (γ = 5 there); None: unweighted.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    k = torch.randint(0, schedule.T, (x0.shape[0],), device=x0.device) if k is None else k
    noise = torch.randn_like(x0) if noise is None else noise
    out = model(q_sample(schedule, x0, k, noise), schedule.model_time(k), y)
    target = noise if prediction == "eps" else v_target(x0, noise, schedule.abar(k, x0))
    if min_snr_gamma is None:
        return F.mse_loss(out.float(), target.float())
    abar = schedule.alphas_cumprod.to(x0.device)[k]  # (B,) float64
    snr = abar / (1 - abar)
    weight = snr.clamp(max=min_snr_gamma) / (snr if prediction == "eps" else snr + 1)  # (B,)
    per_sample = (out.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
    return (weight.float() * per_sample).mean()


def respaced_steps(schedule: DDPMSchedule, steps: int, spacing: str = "trailing") -> list[int]:
    """The `steps` integer steps a sampler visits, from the noisiest down.

    'trailing' (Lin et al. 2024, Table 2): T−1, T−1−T/steps, … — the last step lands on the clean image from
    k = T/steps − 1, so every step does real work. 'linspace': evenly from T−1 down to 0 inclusive (DDIM's
    original choice), whose last step starts at k = 0, where √SNR ≈ 100 and x̂0 ≈ x: at few steps it is wasted.
    """
    if not isinstance(steps, int) or not 1 <= steps <= schedule.T:
        raise ValueError(f"steps must be an int in [1, {schedule.T}], got {steps!r}")
    if spacing == "trailing":
        ks = torch.arange(schedule.T, 0, -schedule.T / steps).round().long() - 1
    elif spacing == "linspace":
        ks = torch.linspace(schedule.T - 1, 0, steps).round().long()
    else:
        raise ValueError(f"spacing must be 'trailing' or 'linspace', got {spacing!r}")
    return sorted(set(ks.tolist()), reverse=True)


def ddpm_solve(eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
               schedule: DDPMSchedule, steps: int = 250, method: str = "ddim", eta: float = 0.0,
               clip_x0: bool = True, spacing: str = "trailing", generator: torch.Generator | None = None,
               prediction: str = "eps") -> torch.Tensor:
    """Run the reverse chain from `noise` with 'ddim' (deterministic for η = 0) or 'ancestral' updates; NFE = steps.

    `eps_fn(x, t)` is the network: it returns ε̂, or v̂ for a v-prediction model (`prediction="v"`). The x0 estimate
    is clipped to [−1, 1] at each step when `clip_x0` (pixel space, as DDPM does).
    """
    if method not in ("ddim", "ancestral"):
        raise ValueError(f"method must be 'ddim' or 'ancestral', got {method!r}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    eta = 1.0 if method == "ancestral" else eta
    ks, abar, x = respaced_steps(schedule, steps, spacing), schedule.alphas_cumprod, noise
    for j, k in enumerate(ks):
        a_t, a_prev = abar[k].item(), abar[ks[j + 1]].item() if j + 1 < len(ks) else 1.0
        out = eps_fn(x, schedule.model_time(torch.full((x.shape[0],), k, device=x.device)))
        eps, x0 = eps_and_x0(x, out, a_t, prediction)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)  # keep ε consistent with the clipped x0
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if sigma > 0 and j + 1 < len(ks):
            z = torch.randn(x.shape, generator=generator, device=None if generator is None else generator.device)
            x = x + sigma * z.to(x.device)
    return x
