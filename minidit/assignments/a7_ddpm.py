"""A7 — DDPM: the noise schedule ᾱ, forward noising q_sample, one DDIM step and a DDIM sampler.

References: `minidit.ddpm` (DDPMSchedule, q_sample, ddpm_solve with method='ddim', clip_x0=False on DDIM's original
'linspace' steps). Time runs as in the package: integer steps k = 0 … T−1, k = 0 the least noisy, and the network
sees t = k / T.
The checks use `ToyEps`, a small fixed ε-network, and steps where ᾱ is far from 0 and 1, so that confusing √ᾱ with
ᾱ, β with ᾱ, an index off by one, or the direction of time shows up. Images are float32 and the schedule float64 (as
in the package), so that a result in the wrong dtype shows up too.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minidit import ddpm
from minidit.assignments.common import judge_times, toy_inputs
from minidit.grading.checks import Answer, Check, randn

NAME = "A7_ddpm"
TITLE = "DDPM: schedule, forward noising and DDIM sampling"
DISABLED = ["minidit.ddpm:DDPMSchedule", "minidit.ddpm:q_sample", "minidit.ddpm:predict_x0",
            "minidit.ddpm:ddpm_loss", "minidit.ddpm:ddpm_solve"]

B, C, S = 3, 2, 4  # batch, channels, image size
T = 1000
LINSPACE_STEPS = {1: [999], 4: [999, 666, 333, 0]}  # ddpm.respaced_steps(schedule, n, spacing="linspace")


class ToyEps(nn.Module):
    """A fixed, untrained ε-model eps(x, t, y) for inputs (B, C, …) that depends on x, t and the label y."""

    null_label = 3

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mix = nn.Parameter(torch.randn(C, C, generator=g) / C**0.5)
        self.time = nn.Parameter(torch.randn(C, generator=g))
        self.label = nn.Parameter(0.3 * torch.randn(4, C, generator=g))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("oc,bchw->bohw", self.mix, x)  # (B, C, S, S)
        tb = t.reshape(-1, 1, 1, 1)
        return torch.tanh(h) * (0.5 + tb * self.time.reshape(1, C, 1, 1)) + self.label[y].reshape(-1, C, 1, 1)


def _betas() -> torch.Tensor:
    return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)  # DDPM's linear schedule (DiT, ADM)


def _other_betas() -> torch.Tensor:
    return torch.linspace(0.001, 0.05, 50, dtype=torch.float64) ** 1.5 * 4


def _abar(betas: torch.Tensor | None = None) -> torch.Tensor:
    """ᾱ in float64, computed here (the package's DDPMSchedule is switched off while a check runs)."""
    return torch.cumprod(1 - (_betas() if betas is None else betas), dim=0)


def _alphas_answer() -> Answer:
    cases = [_betas(), _other_betas()]
    return Answer([_abar(b) for b in cases],
                  {"ᾱ_k is the product of (1 − β_j), not 1 minus the product of the β_j":
                   [1 - torch.cumprod(b, 0) for b in cases],
                   "off by one: ᾱ_k includes the factor (1 − β_k) of step k itself (ᾱ_0 = 1 − β_0)":
                   [torch.cat([torch.ones(1, dtype=b.dtype), _abar(b)[:-1]]) for b in cases]})


# ---- q_sample ----------------------------------------------------------------------------------------------------
def _steps() -> torch.Tensor:
    return torch.tensor([10, 250, 600])  # ᾱ ≈ 0.99, 0.52, 0.04: neither ≈ 0 nor ≈ 1 for the middle one


def _q_reference(abar, x0, k, noise):
    a = abar[k].reshape(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def _q_probe(q_sample) -> torch.Tensor:
    x0, noise = toy_inputs(1, B, C, S, S)  # float32 images
    return q_sample(_abar(), x0, _steps(), noise)


def _q_answer() -> Answer:
    x0, noise = toy_inputs(1, B, C, S, S)
    abar, k = _abar(), _steps()

    def with_steps(steps):
        return _q_reference(abar, x0, steps, noise)

    a = abar[k].reshape(-1, 1, 1, 1).float()
    return Answer(with_steps(k), {
        "the index is off by one: use ᾱ at step k itself": with_steps(k + 1),
        "the index is off by one the other way: use ᾱ at step k itself": with_steps(k - 1),
        "time is reversed: step k = 0 is the least noisy (ᾱ close to 1), k = T − 1 the noisiest": with_steps(T - 1 - k),
        "the coefficients must be square roots, √ᾱ and √(1 − ᾱ), not the variances ᾱ and 1 − ᾱ":
            a * x0 + (1 - a) * noise,
        "x0 and noise are swapped: x0 gets √ᾱ, the noise √(1 − ᾱ)": (1 - a).sqrt() * x0 + a.sqrt() * noise})


def _q_dtype_probe(q_sample) -> list:
    out = []
    for dtype in (torch.float32, torch.float64):
        x0, noise = (v.to(dtype) for v in toy_inputs(3, B, C, S, S))
        x = q_sample(_abar(), x0, _steps(), noise)
        out.append(str(x.dtype).removeprefix("torch.") if isinstance(x, torch.Tensor) else type(x).__name__)
    return out


def _judge_dtype(got, _) -> str | None:
    if got == ["float32", "float64"]:
        return None
    if isinstance(got, list) and got[:1] == ["float64"]:
        return ("float32 images came back as float64: ᾱ is stored in float64 here, so convert what you take from it "
                "to x0's dtype before mixing (x_k must have the dtype of x0)")
    return f"x_k must have the dtype of x0: expected ['float32', 'float64'] for float32 and float64 images, got {got}"


def _q_shapes(q_sample) -> list:
    return [q_sample(_abar(), x0, _steps(), noise) for x0, noise in (toy_inputs(5, B, 7), toy_inputs(6, B, 5, C))]


def _q_variance_probe(q_sample) -> float:
    """Var(x_k) for data of variance 1 is ᾱ + (1 − ᾱ) = 1 only if the coefficients are √ᾱ and √(1 − ᾱ)."""
    n = 50_000
    x0, noise = randn(3, n, 1, 1, 1), randn(4, n, 1, 1, 1)
    return float(q_sample(_abar(), x0, torch.full((n,), 250), noise).var())


# ---- DDIM --------------------------------------------------------------------------------------------------------
def _ddim_step_reference(x, eps, a_t, a_prev):
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps


def _step_cases():
    abar = _abar()
    return [(randn(5, B, C, S, S), randn(6, B, C, S, S), float(abar[600]), float(abar[400])),
            (randn(7, B, C, S, S), randn(8, B, C, S, S), float(abar[100]), 1.0)]  # the last step: ᾱ_prev = 1


def _step_answer() -> Answer:
    def wrong_sign(x, eps, a_t, a_prev):
        x0 = (x + math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps

    def swapped(x, eps, a_t, a_prev):
        return _ddim_step_reference(x, eps, a_prev if a_prev < 1 else a_t, a_t)

    return Answer([_ddim_step_reference(*c) for c in _step_cases()],
                  {"the clean-image estimate subtracts the noise: x̂0 = (x − √(1 − ᾱ_t)·ε) / √ᾱ_t":
                   [wrong_sign(*c) for c in _step_cases()],
                   "a_t and a_prev are swapped: estimate x̂0 at the current level a_t, re-noise it to a_prev":
                   [swapped(*c) for c in _step_cases()]})


def _ddim_sample_probe(ddim_sample) -> list:
    return [ddim_sample(ToyEps(), _abar(), randn(9, B, C, S, S), torch.tensor([0, 1, 2]), LINSPACE_STEPS[n])
            for n in (1, 4)]


@torch.no_grad()
def _ddim_sample_expect() -> list:
    model, y, sched = ToyEps(), torch.tensor([0, 1, 2]), ddpm.DDPMSchedule("linear", T)
    return [ddpm.ddpm_solve(lambda x, t: model(x, t, y), randn(9, B, C, S, S), sched, steps, method="ddim",
                            clip_x0=False, spacing="linspace") for steps in (1, 4)]


def _ddim_times_probe(ddim_sample) -> list:
    calls = []
    model = ToyEps()

    def recording(x, t, y):
        calls.append({"batch": int(x.shape[0]), "t_shape": list(t.shape),
                      "t": [round(float(v), 6) for v in t.reshape(-1)]})
        return model(x, t, y)

    ddim_sample(recording, _abar(), randn(10, B, C, S, S), torch.tensor([0, 1, 2]), LINSPACE_STEPS[4])
    return calls


def _judge_ddim_times(calls, _) -> str | None:
    msg = judge_times(calls, [0.999, 0.666, 0.333, 0.0], B, what="the ε-model")
    if msg and isinstance(calls, list) and calls and isinstance(calls[0], dict) and calls[0].get("t", [0])[0] > 1:
        return msg + ": the model takes t = k / T in [0, 1], not the integer step k"
    return msg


CHECKS = [
    Check("alphas_cumprod: ᾱ_k = Π_{j≤k} (1 − β_j), for the linear betas and for another schedule", points=1,
          probe=lambda alphas_cumprod: [alphas_cumprod(_betas()), alphas_cumprod(_other_betas())],
          expect=_alphas_answer, atol=1e-8),
    Check("q_sample: x_k = √ᾱ_k·x0 + √(1 − ᾱ_k)·noise at steps 10, 250, 600 (float32 images)", points=2,
          probe=_q_probe, expect=_q_answer),
    Check("q_sample: x_k has the dtype of x0 (float32 and float64 images, a float64 schedule)", points=1,
          probe=_q_dtype_probe, expect=lambda: None, judge=_judge_dtype),
    Check("q_sample: any shape — points (B, D) and tokens (B, T, D), ᾱ_k broadcast over every axis but the first",
          points=1, probe=_q_shapes, expect=lambda: _q_shapes(_q_reference)),
    Check("q_sample: keeps unit variance (Var x_k = ᾱ + (1 − ᾱ) = 1)", points=1,
          probe=_q_variance_probe, expect=lambda: 1.0, atol=0.03, rtol=0.0),
    Check("ddim_step: x̂0 = (x − √(1−ᾱ_t)·ε)/√ᾱ_t, then √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·ε", points=2,
          probe=lambda ddim_step: [ddim_step(*case) for case in _step_cases()], expect=_step_answer),
    Check("ddim_sample: matches minidit.ddpm.ddpm_solve(method='ddim', clip_x0=False) with 1 and 4 steps", points=2,
          probe=_ddim_sample_probe, expect=_ddim_sample_expect, atol=1e-4, rtol=1e-4),
    Check("ddim_sample: one call per step, t of shape (B,) = k / T from the noisiest step down (0.999 … 0)",
          points=1, probe=_ddim_times_probe, expect=lambda: None, judge=_judge_ddim_times),
]
