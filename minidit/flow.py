"""Rectified flow (Liu et al. 2022; SD3): the interpolation, the loss, timestep sampling and the Euler/Heun solvers.

Time convention (one for the whole course, as in SD3, diffusers and minRF):
    t ∈ [0, 1], t = 0 is data, t = 1 is noise;  x_t = (1 − t)·x0 + t·ε;  velocity v = dx_t/dt = ε − x0.
Sampling integrates dx/dt = v(x, t) from t = 1 (pure noise) down to t = 0 (data).
Other code bases flip it: facebookresearch/flow_matching and torchcfm use t = 0 noise, t = 1 data
(their velocity is x1 − x0 = data − noise = −v here); SiT also puts data at t = 1. To port a model, use
t_theirs = 1 − t_ours and negate the velocity.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B, ...), t (B,)) → v (B, ...)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − t)·x0 + t·ε, with t (B,) broadcast over the other dims."""
    tb = t.reshape(-1, *([1] * (x0.ndim - 1)))  # (B, 1, 1, 1)
    return (1 - tb) * x0 + tb * noise


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift t_m = α·t / (1 + (α − 1)·t): α > 1 spends more time at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def sample_t(n: int, method: str = "logit_normal", m: float = 0.0, s: float = 1.0, shift: float = 1.0,
             generator: torch.Generator | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Training times (n,): uniform, or logit-normal(m, s) = sigmoid(m + s·N(0, 1)) (SD3's best, §3.1), then shifted."""
    if method == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    elif method == "logit_normal":
        t = torch.sigmoid(m + s * torch.randn(n, generator=generator, device=device))
    else:
        raise ValueError(f"t sampling must be 'uniform' or 'logit_normal', got {method!r}")
    return shift_time(t, shift)


def flow_loss(model: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None = None,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between model(x_t, t, y) and the velocity target v = ε − x0 (a scalar)."""
    t = sample_t(x0.shape[0], device=x0.device) if t is None else t
    noise = torch.randn_like(x0) if noise is None else noise
    v_pred = model(interpolate(x0, noise, t), t, y)
    if v_pred.shape != x0.shape:
        raise ValueError(f"the model predicts {tuple(v_pred.shape)}, the velocity target is {tuple(x0.shape)}: "
                         "a rectified-flow model must output exactly its input's channels")
    return F.mse_loss(v_pred.float(), (noise - x0).float())


def timesteps(steps: int, shift: float = 1.0, device: torch.device | str | None = None) -> torch.Tensor:
    """steps + 1 times from 1 (noise) down to 0 (data), uniform then shifted."""
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


def euler_sample(velocity: VelocityFn, noise: torch.Tensor, steps: int = 20, shift: float = 1.0) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 to 0 with `steps` Euler steps (NFE = steps)."""
    x = noise
    ts = timesteps(steps, shift, device=noise.device)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t_cur) * velocity(x, t_cur.expand(x.shape[0]))
    return x


def heun_sample(velocity: VelocityFn, noise: torch.Tensor, steps: int = 10, shift: float = 1.0) -> torch.Tensor:
    """Heun's second-order method (trapezoid predictor–corrector), NFE = 2·steps − 1.

    The last step (to t = 0) is a plain Euler step, as in EDM: the corrector would need v at t = 0 exactly,
    a time the network almost never sees in training (logit-normal t puts ~no mass there).
    """
    x = noise
    ts = timesteps(steps, shift, device=noise.device)
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        v1 = velocity(x, t_cur.expand(x.shape[0]))
        x_pred = x + (t_next - t_cur) * v1
        if i == steps - 1:
            return x_pred
        v2 = velocity(x_pred, t_next.expand(x.shape[0]))
        x = x + (t_next - t_cur) * 0.5 * (v1 + v2)
    return x
