"""Rectified flow (Liu et al. 2022; SD3): the loss, timestep sampling, Euler/Heun samplers and CFG.

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

T_SAMPLING = ("uniform", "logit_normal")


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − t)·x0 + t·ε, with t (B,) broadcast over the other dims."""
    tb = t.reshape(-1, *([1] * (x0.ndim - 1)))  # (B, 1, 1, 1)
    return (1 - tb) * x0 + tb * noise


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift t_m = α·t / (1 + (α − 1)·t): α > 1 spends more time at high noise."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def sample_t(
    n: int,
    method: str = "logit_normal",
    m: float = 0.0,
    s: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training times (n,): uniform, or logit-normal(m, s) = sigmoid(m + s·N(0, 1)) (SD3's best, §3.1), then shifted."""
    if method == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    elif method == "logit_normal":
        if s <= 0:
            raise ValueError(f"logit-normal scale s must be > 0, got {s}")
        t = torch.sigmoid(m + s * torch.randn(n, generator=generator, device=device))
    else:
        raise ValueError(f"t sampling must be one of {T_SAMPLING}, got {method!r}")
    return shift_time(t, shift) if shift != 1.0 else t


def flow_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    drop_mask: torch.Tensor | None = None,
    **model_kwargs,
) -> torch.Tensor:
    """Mean squared error between model(x_t, t, y) and the velocity target v = ε − x0 (a scalar)."""
    if t is None:
        t = sample_t(x0.shape[0], device=x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    if noise.shape != x0.shape or t.shape != (x0.shape[0],):
        raise ValueError(f"noise must match x0 {tuple(x0.shape)} and t be ({x0.shape[0]},); "
                         f"got {tuple(noise.shape)} and {tuple(t.shape)}")
    x_t = interpolate(x0, noise, t)
    v_pred = model(x_t, t, y, drop_mask=drop_mask, **model_kwargs)
    return F.mse_loss(v_pred.float(), (noise - x0).float())


def timesteps(steps: int, shift: float = 1.0, device: torch.device | str | None = None) -> torch.Tensor:
    """steps + 1 times from 1 (noise) down to 0 (data), uniform then shifted."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    t = torch.linspace(1.0, 0.0, steps + 1, device=device)
    return shift_time(t, shift) if shift != 1.0 else t


@torch.no_grad()
def euler_sample(velocity: VelocityFn, noise: torch.Tensor, steps: int = 20, shift: float = 1.0) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 to 0 with `steps` Euler steps (NFE = steps)."""
    x = noise
    ts = timesteps(steps, shift, device=noise.device)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        v = velocity(x, t_cur.expand(x.shape[0]))
        x = x + (t_next - t_cur) * v
    return x


@torch.no_grad()
def heun_sample(velocity: VelocityFn, noise: torch.Tensor, steps: int = 10, shift: float = 1.0) -> torch.Tensor:
    """Heun's second-order method (trapezoid predictor–corrector), NFE = 2·steps − 1.

    The last step (to t = 0) is a plain Euler step, as in EDM: the corrector would need v at t = 0 exactly,
    a time the network almost never sees in training (logit-normal t puts ~no mass there).
    """
    x = noise
    ts = timesteps(steps, shift, device=noise.device)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        B = x.shape[0]
        v1 = velocity(x, t_cur.expand(B))
        x_pred = x + (t_next - t_cur) * v1
        if t_next == 0:
            x = x_pred
            break
        v2 = velocity(x_pred, t_next.expand(B))
        x = x + (t_next - t_cur) * 0.5 * (v1 + v2)
    return x


SAMPLERS = {"euler": euler_sample, "heun": heun_sample}


def guided(
    model: torch.nn.Module,
    y: torch.Tensor,
    scale: float,
    interval: tuple[float, float] | None = None,
    guide_model: torch.nn.Module | None = None,
    guide_scale: float = 1.0,
    **model_kwargs,
) -> VelocityFn:
    """Classifier-free guidance as a velocity field: v = v_uncond + scale·(v_cond − v_uncond), on ALL channels.

    Conditional and unconditional predictions come from ONE batched forward ([x, x] with [y, null]).
    scale = 1 is the conditional model; scale = 0 the unconditional one. CFG mixes outputs; it does not
    touch attention weights. With `interval = (lo, hi)` guidance applies only while lo ≤ t ≤ hi and the
    plain conditional prediction is used elsewhere (guidance in a limited interval, Kynkäänniemi et al. 2024).

    Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): with a
    `guide_model` (a weaker model of the same task, e.g. an early snapshot of the same run), the conditional
    prediction is first pushed away from the weak model's, v_c ← v_bad + guide_scale·(v_c − v_bad), and CFG
    then applies to that. The weak model makes the same kind of errors, only more: extrapolating away from it
    removes errors without the loss of diversity that a large CFG scale costs.
    """
    if interval is not None and not 0 <= interval[0] <= interval[1] <= 1:
        raise ValueError(f"interval must be (lo, hi) with 0 ≤ lo ≤ hi ≤ 1, got {interval}")
    if guide_scale < 0:
        raise ValueError(f"guide_scale must be ≥ 0, got {guide_scale}")
    null = torch.full_like(y, model.null_label)
    C = model.config.in_channels  # a learned-sigma model's extra output channels are not a velocity

    def autoguide(cond: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guide_model is None or guide_scale == 1.0:
            return cond
        bad = guide_model(x, t, y, **model_kwargs)[:, :C]
        return bad + guide_scale * (cond - bad)

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        outside = interval is not None and not interval[0] <= float(t[0]) <= interval[1]
        if scale == 1.0 or outside:
            return autoguide(model(x, t, y, **model_kwargs)[:, :C], x, t)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), **model_kwargs)
        cond, uncond = out[:, :C].chunk(2)  # guide every channel (DiT's code guided only 3 of 4, issue #41)
        return uncond + scale * (autoguide(cond, x, t) - uncond)

    return v


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    labels: torch.Tensor,
    steps: int = 20,
    cfg_scale: float = 1.0,
    sampler: str = "euler",
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    batch_size: int = 500,
    cfg_interval: tuple[float, float] | None = None,
    guide_model: torch.nn.Module | None = None,
    guide_scale: float = 1.0,
) -> torch.Tensor:
    """Class-conditional samples (len(labels), C, H, W) in model space (images: [−1, 1], not clamped).

    `guide_model` + `guide_scale` add autoguidance (see `guided`); the guide must take the same inputs.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be ≥ 0, got {cfg_scale}")
    cfg = model.config
    device = next(model.parameters()).device
    labels = labels.to(device)
    shape = (labels.shape[0], cfg.in_channels, cfg.input_size, cfg.input_size)
    if noise is None:
        noise = torch.randn(shape, generator=generator, device="cpu" if generator is None else generator.device)
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
    noise = noise.to(device)
    if guide_model is not None:
        gc = guide_model.config
        if (gc.in_channels, gc.input_size, gc.num_classes) != (cfg.in_channels, cfg.input_size, cfg.num_classes):
            raise ValueError(f"guide_model must take the model's inputs (C, H, classes) = "
                             f"{(cfg.in_channels, cfg.input_size, cfg.num_classes)}, got "
                             f"{(gc.in_channels, gc.input_size, gc.num_classes)}")
    modes = [(m, m.training) for m in (model, guide_model) if m is not None]
    for m, _ in modes:
        m.eval()  # no label dropout while sampling
    try:
        out = []
        for i in range(0, labels.shape[0], batch_size):
            v = guided(model, labels[i : i + batch_size], cfg_scale, cfg_interval, guide_model, guide_scale)
            out.append(SAMPLERS[sampler](v, noise[i : i + batch_size], steps, shift))
    finally:
        for m, was_training in modes:
            m.train(was_training)
    return torch.cat(out)
