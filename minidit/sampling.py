"""Sampling: one loop for every model and solver — noise, eval mode, batches, guidance, then the solver.

Rectified-flow models integrate their ODE with `euler` or `heun` (minidit.flow); DDPM models run their reverse
chain with `ddim` or `ancestral` (minidit.ddpm, which needs the model's noise `schedule`). Guidance (CFG, its
interval, autoguidance) wraps the model the same way for all of them (minidit.guidance).
"""

from __future__ import annotations

import torch

from minidit.ddpm import PREDICTIONS, DDPMSchedule, ddpm_solve
from minidit.flow import euler_sample, heun_sample
from minidit.guidance import check_guidance, guided

SAMPLERS = ("euler", "heun", "ddim", "ancestral")


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    labels: torch.Tensor,
    steps: int = 20,
    sampler: str = "euler",
    cfg_scale: float = 1.0,
    shift: float = 1.0,
    cfg_interval: tuple[float, float] | None = None,
    guide_model: torch.nn.Module | None = None,
    guide_scale: float = 1.0,
    schedule: DDPMSchedule | None = None,
    eta: float = 0.0,
    clip_x0: bool = True,
    spacing: str = "trailing",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    batch_size: int = 500,
    prediction: str = "eps",
) -> torch.Tensor:
    """Samples (len(labels), C, H, W) in model space (images: [−1, 1], not clamped) for labels (N,).

    flow samplers: `shift` is SD3's time shift; DDPM samplers: `schedule`, `eta` (DDIM), `clip_x0` (pixel space),
    `spacing` of the respaced steps (minidit.ddpm.respaced_steps), `prediction`: what the DDPM model outputs
    ("eps" or "v", minidit.ddpm.PREDICTIONS; its TrainConfig.ddpm_prediction).
    Noise comes from `generator` (on its device, CPU by default) unless given; NFE = steps (Heun: 2·steps − 1).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if sampler in ("ddim", "ancestral") and schedule is None:
        raise ValueError(f"the {sampler!r} sampler needs the DDPM model's schedule (schedule=DDPMSchedule(...))")
    if labels.ndim != 1 or not labels.numel() or labels.is_floating_point() \
            or not 0 <= int(labels.min()) <= int(labels.max()) <= model.null_label:
        raise ValueError(f"labels must be integers (N,) in [0, {model.null_label}], got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    check_guidance(model, cfg_scale, cfg_interval, guide_model, guide_scale)
    cfg, device = model.config, next(model.parameters()).device
    shape = (labels.shape[0], cfg.in_channels, cfg.input_size, cfg.input_size)
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=None if generator is None else generator.device)
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")

    def solve(predict, x: torch.Tensor) -> torch.Tensor:
        if sampler == "euler":
            return euler_sample(predict, x, steps, shift)
        if sampler == "heun":
            return heun_sample(predict, x, steps, shift)
        return ddpm_solve(predict, x, schedule, steps, sampler, eta, clip_x0, spacing, generator, prediction)

    models = [m for m in (model, guide_model) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        out = []
        for i in range(0, shape[0], batch_size):
            y = labels[i : i + batch_size].to(device)
            predict = guided(model, y, cfg_scale, cfg_interval, guide_model, guide_scale)
            out.append(solve(predict, noise[i : i + batch_size].to(device)))
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return torch.cat(out)
