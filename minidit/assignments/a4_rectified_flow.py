"""A4 — rectified flow: interpolation, the velocity loss, an Euler sampler (t = 1 → 0) and one-forward CFG.

References: `minidit.flow` (interpolate, euler_sample) and the CFG formula of `minidit.guidance.guided`. The checks
use `ToyVelocity`, a small fixed network v(x, t, y) with 4 channels, so that guiding only some channels or flipping
time shows up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minidit import flow
from minidit.grading.checks import Check, randn

NAME = "A4_rectified_flow"
TITLE = "Rectified flow: loss, Euler sampler and classifier-free guidance"

B, C, S = 3, 4, 4  # batch, channels, image size
NUM_CLASSES = 3


class ToyVelocity(nn.Module):
    """A fixed, untrained velocity model v(x, t, y) (B, C, S, S) that depends on x, t and the label y."""

    null_label = NUM_CLASSES

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mix = nn.Parameter(torch.randn(C, C, generator=g) / C**0.5)
        self.time = nn.Parameter(torch.randn(C, generator=g))
        self.label = nn.Parameter(torch.randn(NUM_CLASSES + 1, C, generator=g))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("oc,bchw->bohw", self.mix, x)  # (B, C, S, S)
        tb = t.reshape(-1, 1, 1, 1)
        return torch.tanh(h) * (1 + tb * self.time.reshape(1, C, 1, 1)) + (1 - tb) * self.label[y].reshape(-1, C, 1, 1)


class Recorder(nn.Module):
    """Wraps a model and records every call: batch size, times and labels (to count forwards)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, y):
        self.calls.append({"batch": int(x.shape[0]), "t": t.detach().reshape(-1).tolist(),
                           "y": y.detach().reshape(-1).tolist()})
        return self.model(x, t, y)


def _t() -> torch.Tensor:
    return torch.tensor([0.0, 0.35, 1.0])


def _labels() -> torch.Tensor:
    return torch.tensor([0, 2, 1])


def _loss_inputs():
    return ToyVelocity(), randn(1, B, C, S, S), _labels(), _t(), randn(2, B, C, S, S)


def _loss_probe(velocity_loss) -> dict:
    model, x0, y, t, noise = _loss_inputs()
    loss = velocity_loss(model, x0, y, t, noise)
    loss.backward()
    return {"loss": loss, "grad_mix": model.mix.grad, "grad_label": model.label.grad}


def _loss_expect() -> dict:
    model, x0, y, t, noise = _loss_inputs()
    loss = F.mse_loss(model(flow.interpolate(x0, noise, t), t, y), noise - x0)
    loss.backward()
    return {"loss": loss, "grad_mix": model.mix.grad, "grad_label": model.label.grad}


def _field(model: nn.Module):
    y = _labels()
    return lambda x, t: model(x, t, y)


def _euler_probe(euler_sample) -> list:
    return [euler_sample(_field(ToyVelocity()), randn(3, B, C, S, S), steps) for steps in (1, 5)]


def _euler_times_probe(euler_sample) -> list:
    rec = Recorder(ToyVelocity())
    euler_sample(_field(rec), randn(4, B, C, S, S), 5)
    return [call["t"] for call in rec.calls]


def _cfg_probe(cfg_velocity) -> list:
    model, x, t, y = ToyVelocity(), randn(5, B, C, S, S), _t(), _labels()
    return [cfg_velocity(model, x, t, y, scale, ToyVelocity.null_label) for scale in (0.0, 1.0, 4.0)]


def _cfg_expect() -> list:
    model, x, t, y = ToyVelocity(), randn(5, B, C, S, S), _t(), _labels()
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, ToyVelocity.null_label))
    return [uncond + s * (cond - uncond) for s in (0.0, 1.0, 4.0)]


def _cfg_calls_probe(cfg_velocity) -> list:
    rec = Recorder(ToyVelocity())
    cfg_velocity(rec, randn(6, B, C, S, S), _t(), _labels(), 3.0, ToyVelocity.null_label)
    return rec.calls


def _one_forward(calls, _) -> str | None:
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        return f"expected the list of recorded model calls, got {type(calls).__name__}"
    if len(calls) != 1:
        sizes = [c.get("batch") for c in calls]
        return f"expected one model call per guided prediction, got {len(calls)} (batch sizes {sizes})"
    call, want_y = calls[0], sorted(_labels().tolist() + [NUM_CLASSES] * B)
    if call.get("batch") != 2 * B or sorted(call.get("y", [])) != want_y:
        return f"expected one batch of {2 * B} with labels {want_y} (in any order), got {call}"
    if sorted(round(float(t), 6) for t in call.get("t", [])) != sorted(round(t, 6) for t in _t().tolist() * 2):
        return f"expected the times {_t().tolist()} twice, got {call.get('t')}"
    return None


CHECKS = [
    Check("interpolate: x_t = (1 − t)·x0 + t·noise (t = 0 data, t = 1 noise)", points=1,
          probe=lambda interpolate: interpolate(randn(7, B, C, S, S), randn(8, B, C, S, S), _t()),
          expect=lambda: flow.interpolate(randn(7, B, C, S, S), randn(8, B, C, S, S), _t())),
    Check("velocity_loss: MSE to the target noise − x0 at x_t, and its gradient", points=3,
          probe=_loss_probe, expect=_loss_expect),
    Check("euler_sample: integrates from t = 1 to t = 0 (1 and 5 steps)", points=2,
          probe=_euler_probe,
          expect=lambda: [flow.euler_sample(_field(ToyVelocity()), randn(3, B, C, S, S), n) for n in (1, 5)]),
    Check("euler_sample: one velocity call per step, at t = 1, 0.8, 0.6, 0.4, 0.2", points=1,
          probe=_euler_times_probe, expect=lambda: [[t] * B for t in (1.0, 0.8, 0.6, 0.4, 0.2)], atol=1e-6),
    Check("cfg_velocity: uncond + scale·(cond − uncond) on every channel (scales 0, 1, 4)", points=2,
          probe=_cfg_probe, expect=_cfg_expect),
    Check("cfg_velocity: ONE batched forward of 2B samples (each label once, and B null labels)", points=1,
          probe=_cfg_calls_probe, judge=_one_forward),
]
