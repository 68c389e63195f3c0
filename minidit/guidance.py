"""Classifier-free guidance (Ho & Salimans 2022) for both objectives: label dropout in training, the guided
prediction in sampling, guidance in a limited interval (Kynkäänniemi et al. 2024) and autoguidance (Karras et al. 2024).

One model learns p(x | y) and p(x) together: in training, a fraction of labels is replaced by the null label. At
sampling time the two predictions are extrapolated, pred = uncond + scale·(cond − uncond), on ALL channels. The
prediction is a velocity (rectified flow) or a noise (DDPM); the formula is the same, since both are affine in the
score. CFG mixes two *outputs*: it does not touch attention weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

PredictionFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B, ...), t (B,)) → prediction (B, ...)


def drop_labels(y: torch.Tensor, drop_mask: torch.Tensor, null_label: int) -> torch.Tensor:
    """The labels (or caption ids) with those where drop_mask is True replaced by the null label."""
    return torch.where(drop_mask, torch.full_like(y, null_label), y)


def guided(
    model: torch.nn.Module,
    y: torch.Tensor,
    scale: float = 1.0,
    interval: tuple[float, float] | None = None,
    guide_model: torch.nn.Module | None = None,
    guide_scale: float = 1.0,
) -> PredictionFn:
    """The guided prediction as a function of (x, t): uncond + scale·(cond − uncond).

    Conditional and unconditional predictions come from ONE batched forward ([x, x] with [y, null]).
    scale = 1 is the conditional model; scale = 0 the unconditional one. With `interval = (lo, hi)` guidance
    applies only while lo ≤ t ≤ hi and the plain conditional prediction is used elsewhere.

    Autoguidance: with a `guide_model` (a weaker model of the same task, e.g. an early snapshot of the same run),
    the conditional prediction is first pushed away from the weak model's, cond ← bad + guide_scale·(cond − bad),
    and CFG then applies to that. The weak model makes the same kind of errors, only more: extrapolating away from
    it removes errors without the loss of diversity that a large CFG scale costs.
    """
    null = torch.full_like(y, model.null_label)

    def autoguide(cond: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guide_model is None or guide_scale == 1.0:
            return cond
        bad = guide_model(x, t, y)
        return bad + guide_scale * (cond - bad)

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        outside = interval is not None and not interval[0] <= float(t[0]) <= interval[1]
        if scale == 1.0 or outside:
            return autoguide(model(x, t, y), x, t)
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return uncond + scale * (autoguide(cond, x, t) - uncond)

    return predict


def check_guidance(model, cfg_scale: float, interval, guide_model, guide_scale: float) -> None:
    """ValueError unless the guidance settings make sense for `model` (checked once, before sampling)."""
    if cfg_scale < 0 or guide_scale < 0:
        raise ValueError(f"cfg_scale and guide_scale must be ≥ 0, got {cfg_scale}, {guide_scale}")
    if interval is not None and not 0 <= interval[0] <= interval[1] <= 1:
        raise ValueError(f"cfg_interval must be (lo, hi) with 0 ≤ lo ≤ hi ≤ 1, got {interval}")
    if guide_model is not None:
        want, got = (inputs_of(model), inputs_of(guide_model))
        if want != got:
            raise ValueError(f"guide_model must take the model's inputs (channels, size, null label) {want}, got {got}")


def inputs_of(model) -> tuple[int, int, int]:
    """(input channels, input size, null label) of a model: what a guide must share with the model it guides."""
    return model.config.in_channels, model.config.input_size, model.null_label
