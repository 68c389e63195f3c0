"""A4 — rectified flow: interpolation, the velocity loss, an Euler sampler (t = 1 → 0) and one-forward CFG.

References: `minidit.flow` (interpolate, euler_sample) and the CFG formula of `minidit.guidance.guided`. The checks
use `ToyVelocity`, a small fixed model v(x, t, y) with 4 channels, on images (B, C, H, W), tokens (B, T, C) and
points (B, C), so that guiding only some channels, flipping time or handling only 4-D inputs shows up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minidit import flow
from minidit.assignments.common import (
    Recorder,
    ToyVelocity,
    judge_one_forward,
    judge_times,
    record_velocity,
    toy_inputs,
)
from minidit.grading.checks import Answer, Check, compare

NAME = "A4_rectified_flow"
TITLE = "Rectified flow: loss, Euler sampler and classifier-free guidance"
# the package's own versions of what the student writes: they raise while a check runs
DISABLED = ["minidit.flow:interpolate", "minidit.flow:flow_loss", "minidit.flow:euler_sample",
            "minidit.flow:heun_sample", "minidit.guidance:guided", "minidit.sampling:sample"]

B, C = 3, 4
SHAPES = {"images (B, C, H, W)": (B, C, 4, 4), "tokens (B, T, C)": (B, 5, C), "points (B, C)": (B, C)}


def _t() -> torch.Tensor:
    return torch.tensor([0.0, 0.35, 1.0])


def _labels() -> torch.Tensor:
    return torch.tensor([0, 2, 1])


def _interpolate_cases(interpolate, shapes) -> list:
    return [interpolate(*toy_inputs(7 + i, *SHAPES[s]), _t()) for i, s in enumerate(shapes)]


def _interpolate_answer(shapes) -> Answer:
    def cases(fn):
        return _interpolate_cases(fn, shapes)

    def reversed_time(x0, noise, t):
        return flow.interpolate(x0, noise, 1 - t)

    return Answer(cases(flow.interpolate), {"t = 0 must be the data and t = 1 the noise: yours is reversed":
                                            cases(reversed_time)})


# ---- velocity_loss ---------------------------------------------------------------------------------------------
def _loss_inputs(shape):
    x0, noise = toy_inputs(1, *shape)
    return ToyVelocity(), x0, _labels(), _t(), noise


def _loss_values(velocity_loss) -> list:
    out = []
    for shape in (SHAPES["images (B, C, H, W)"], SHAPES["points (B, C)"]):
        loss = velocity_loss(*_loss_inputs(shape))
        out.append(loss.detach() if isinstance(loss, torch.Tensor) else loss)
    return out


def _loss_answer() -> Answer:
    right, per_sample, flipped, at_x0 = [], [], [], []
    with torch.no_grad():
        for shape in (SHAPES["images (B, C, H, W)"], SHAPES["points (B, C)"]):
            model, x0, y, t, noise = _loss_inputs(shape)
            v = model(flow.interpolate(x0, noise, t), t, y)
            sq = (v - (noise - x0)) ** 2
            right.append(sq.mean())
            per_sample.append(sq.flatten(1).sum(1).mean())
            flipped.append(F.mse_loss(v, x0 - noise))
            at_x0.append(F.mse_loss(model(x0, t, y), noise - x0))
    return Answer(right, {"a sum over each sample's values, averaged over the batch, instead of the mean over every "
                          "element": per_sample,
                          "the target has the wrong sign: the velocity is noise − x0 (dx/dt along the path)": flipped,
                          "the model must see x_t, not x0": at_x0})


def _judge_loss(got, want: Answer) -> str | None:
    if isinstance(got, list):
        for g, name in zip(got, ("images", "points")):
            if isinstance(g, torch.Tensor) and g.ndim != 0:
                return f"velocity_loss must return a scalar (one number, the mean), got shape {tuple(g.shape)} ({name})"
    return want.explain(got)


def _grad_probe(velocity_loss) -> dict:
    model, x0, y, t, noise = _loss_inputs(SHAPES["images (B, C, H, W)"])
    loss = velocity_loss(model, x0, y, t, noise)
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        return {"requires_grad": False}
    loss.backward()
    return {"requires_grad": True, "grad_mix": model.mix.grad, "grad_label": model.label.grad}


def _grad_expect() -> dict:
    model, x0, y, t, noise = _loss_inputs(SHAPES["images (B, C, H, W)"])
    F.mse_loss(model(flow.interpolate(x0, noise, t), t, y), noise - x0).backward()
    return {"requires_grad": True, "grad_mix": model.mix.grad, "grad_label": model.label.grad}


def _judge_grad(got, want) -> str | None:
    if isinstance(got, dict) and got.get("requires_grad") is False:
        return ("the loss has no graph back to the model (computed under torch.no_grad() or detached): training "
                "could not backpropagate through it")
    return compare(got, want, 1e-5, 1e-4)


# ---- euler_sample ----------------------------------------------------------------------------------------------
def _field(model, y):
    return lambda x, t: model(x, t, y)


def randn_like_shape(seed: int, shape) -> torch.Tensor:
    return toy_inputs(seed, *shape)[0]


def _euler_cases(euler_sample) -> list:
    model, y = ToyVelocity(), _labels()
    images, points = randn_like_shape(3, SHAPES["images (B, C, H, W)"]), randn_like_shape(4, SHAPES["points (B, C)"])
    return [euler_sample(_field(model, y), images, 1), euler_sample(_field(model, y), images, 5),
            euler_sample(_field(model, y), points, 3)]


def _euler_answer() -> Answer:
    def backwards(velocity, noise, steps):  # from t = 0 to t = 1
        x, ts = noise, torch.linspace(0.0, 1.0, steps + 1)
        for a, b in zip(ts[:-1], ts[1:]):
            x = x + (b - a) * velocity(x, a.expand(x.shape[0]))
        return x

    def wrong_sign(velocity, noise, steps):
        x, ts = noise, torch.linspace(1.0, 0.0, steps + 1)
        for a, b in zip(ts[:-1], ts[1:]):
            x = x - (b - a) * velocity(x, a.expand(x.shape[0]))
        return x

    with torch.no_grad():
        return Answer(_euler_cases(flow.euler_sample),
                      {"time runs the wrong way: integrate from t = 1 (noise) down to t = 0 (data)":
                       _euler_cases(backwards),
                       "each step moves the wrong way: the step is (t_next − t_cur)·v, and t_next − t_cur < 0":
                       _euler_cases(wrong_sign)})


def _euler_times_probe(euler_sample) -> list:
    velocity = record_velocity(_field(ToyVelocity(), _labels()))
    euler_sample(velocity, randn_like_shape(5, SHAPES["images (B, C, H, W)"]), 5)
    return velocity.calls


# ---- cfg_velocity ----------------------------------------------------------------------------------------------
def _cfg_cases(cfg_velocity) -> list:
    model, t, y = ToyVelocity(), _t(), _labels()
    out = []
    for shape in (SHAPES["images (B, C, H, W)"], SHAPES["points (B, C)"]):
        x = randn_like_shape(6, shape)
        out += [cfg_velocity(model, x, t, y, scale, model.null_label) for scale in (0.0, 1.0, 4.0)]
    return out


def _cfg_answer() -> Answer:
    def formula(sign: float):
        def cfg(model, x, t, y, scale, null_label):
            cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, null_label))
            return uncond + scale * (cond - uncond) if sign > 0 else cond + scale * (uncond - cond)
        return cfg

    with torch.no_grad():
        return Answer(_cfg_cases(formula(1)), {
            "guidance points the wrong way: start from the unconditional prediction and move towards the conditional "
            "one": lambda: _cfg_cases(formula(-1))})


def _cfg_calls_probe(cfg_velocity) -> list:
    rec = Recorder(ToyVelocity())
    cfg_velocity(rec, randn_like_shape(8, SHAPES["images (B, C, H, W)"]), _t(), _labels(), 3.0, rec.null_label)
    return rec.calls


CHECKS = [
    Check("interpolate: x_t = (1 − t)·x0 + t·noise on images (B, C, H, W); t = 0 data, t = 1 noise", points=1,
          probe=lambda interpolate: _interpolate_cases(interpolate, ["images (B, C, H, W)"]),
          expect=lambda: _interpolate_answer(["images (B, C, H, W)"])),
    Check("interpolate: any shape — tokens (B, T, C) and points (B, C), t broadcast over every axis but the first",
          points=1, probe=lambda interpolate: _interpolate_cases(interpolate, ["tokens (B, T, C)", "points (B, C)"]),
          expect=lambda: _interpolate_answer(["tokens (B, T, C)", "points (B, C)"])),
    Check("velocity_loss: the mean over every element of (v − (noise − x0))², on images and on points", points=2,
          probe=_loss_values, expect=_loss_answer, judge=lambda got, want: _judge_loss(got, want)),
    Check("velocity_loss: differentiable — a graph back to the model's parameters, with the right gradients",
          points=1, probe=_grad_probe, expect=_grad_expect, judge=_judge_grad),
    Check("euler_sample: integrates from t = 1 to t = 0 (1 and 5 steps on images, 3 steps on points)", points=2,
          probe=_euler_cases, expect=_euler_answer),
    Check("euler_sample: one velocity call per step, t of shape (B,) at t = 1, 0.8, 0.6, 0.4, 0.2", points=1,
          probe=_euler_times_probe, expect=lambda: None,
          judge=lambda calls, _: judge_times(calls, [1.0, 0.8, 0.6, 0.4, 0.2], B)),
    Check("cfg_velocity: uncond + scale·(cond − uncond) on every channel (scales 0, 1, 4; images and points)",
          points=2, probe=_cfg_cases, expect=_cfg_answer),
    Check("cfg_velocity: ONE batched forward of 2B samples (each label once, and B null labels)", points=1,
          probe=_cfg_calls_probe, expect=lambda: None,
          judge=lambda calls, _: judge_one_forward(calls, _labels().tolist(), _t().tolist(), 3)),
]
