"""A7 — DDPM: the noise schedule ᾱ, forward noising q_sample, one DDIM step and a DDIM sampler.

References: `minidit.ddpm` (DDPMSchedule, q_sample, ddpm_solve with method='ddim', clip_x0=False on DDIM's original
'linspace' steps). Time runs as in the package: integer steps k = 0 … T−1, k = 0 the least noisy, and the network
sees t = k / T.
The checks use `ToyEps`, a small fixed ε-network, and steps where ᾱ is far from 0 and 1, so that confusing √ᾱ with
ᾱ, β with ᾱ, or the direction of time shows up.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minidit import ddpm
from minidit.grading.checks import Check, randn

NAME = "A7_ddpm"
TITLE = "DDPM: schedule, forward noising and DDIM sampling"

B, C, S = 3, 2, 4  # batch, channels, image size
T = 1000


class ToyEps(nn.Module):
    """A fixed, untrained ε-model eps(x, t, y) (B, C, S, S) that depends on x, t and the label y."""

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
    return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)


def _abar() -> torch.Tensor:
    return ddpm.DDPMSchedule("linear", T).alphas_cumprod


def _steps() -> torch.Tensor:
    return torch.tensor([10, 250, 600])  # ᾱ ≈ 0.99, 0.52, 0.04: neither ≈ 0 nor ≈ 1 for the middle one


def _q_inputs():
    return randn(1, B, C, S, S), _steps(), randn(2, B, C, S, S)


def _q_probe(q_sample) -> torch.Tensor:
    x0, k, noise = _q_inputs()
    return q_sample(_abar(), x0, k, noise)


def _q_expect() -> torch.Tensor:
    x0, k, noise = _q_inputs()
    return ddpm.q_sample(ddpm.DDPMSchedule("linear", T), x0.double(), k, noise.double())


def _q_variance_probe(q_sample) -> float:
    """Var(x_k) for data of variance 1 is ᾱ + (1 − ᾱ) = 1 only if the coefficients are √ᾱ and √(1 − ᾱ)."""
    n = 50_000
    x0, noise = randn(3, n, 1, 1, 1), randn(4, n, 1, 1, 1)
    return float(q_sample(_abar(), x0, torch.full((n,), 250), noise).var())


def _ddim_step_reference(x, eps, a_t, a_prev):
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps


def _step_cases():
    abar = _abar()
    return [(randn(5, B, C, S, S), randn(6, B, C, S, S), float(abar[600]), float(abar[400])),
            (randn(7, B, C, S, S), randn(8, B, C, S, S), float(abar[100]), 1.0)]  # the last step: ᾱ_prev = 1


def _ddim_sample_probe(ddim_sample) -> list:
    out = []
    for steps in (1, 4):
        ks = ddpm.respaced_steps(ddpm.DDPMSchedule("linear", T), steps, spacing="linspace")  # 999 … 0
        out.append(ddim_sample(ToyEps(), _abar(), randn(9, B, C, S, S), torch.tensor([0, 1, 2]), ks))
    return out


@torch.no_grad()
def _ddim_sample_expect() -> list:
    model, y, sched = ToyEps(), torch.tensor([0, 1, 2]), ddpm.DDPMSchedule("linear", T)
    return [ddpm.ddpm_solve(lambda x, t: model(x, t, y), randn(9, B, C, S, S), sched, steps, method="ddim",
                            clip_x0=False, spacing="linspace") for steps in (1, 4)]


def _ddim_times_probe(ddim_sample) -> list:
    calls = []
    model = ToyEps()

    def recording(x, t, y):
        calls.append(t.reshape(-1).tolist())
        return model(x, t, y)

    ddim_sample(recording, _abar(), randn(10, B, C, S, S), torch.tensor([0, 1, 2]), [999, 666, 333, 0])
    return calls


CHECKS = [
    Check("alphas_cumprod: ᾱ_k = Π_{j≤k} (1 − β_j) for the linear betas", points=1,
          probe=lambda alphas_cumprod: alphas_cumprod(_betas()), expect=_abar, atol=1e-8),
    Check("q_sample: x_k = √ᾱ_k·x0 + √(1 − ᾱ_k)·noise at steps 10, 250, 600", points=2,
          probe=_q_probe, expect=_q_expect),
    Check("q_sample: keeps unit variance (Var x_k = ᾱ + (1 − ᾱ) = 1)", points=1,
          probe=_q_variance_probe, expect=lambda: 1.0, atol=0.03, rtol=0.0),
    Check("ddim_step: x0 = (x − √(1−ᾱ_t)·ε)/√ᾱ_t, then √ᾱ_prev·x0 + √(1−ᾱ_prev)·ε", points=2,
          probe=lambda ddim_step: [ddim_step(*case) for case in _step_cases()],
          expect=lambda: [_ddim_step_reference(*case) for case in _step_cases()]),
    Check("ddim_sample: matches minidit.ddpm.ddpm_solve(method='ddim', clip_x0=False) with 1 and 4 steps", points=2,
          probe=_ddim_sample_probe, expect=_ddim_sample_expect, atol=1e-4, rtol=1e-4),
    Check("ddim_sample: one call per step, at t = k / T from the noisiest step down (0.999, 0.666, 0.333, 0)",
          points=1, probe=_ddim_times_probe, expect=lambda: [[k / T] * B for k in (999, 666, 333, 0)], atol=1e-6),
]
