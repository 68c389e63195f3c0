"""A10 — reflow on a 2-D toy: the exact velocity field, a straightness measure, and the reflow coupling.

Rectified flow (Liu et al. 2022, §2.3 "reflow"): train a flow, pair each noise with the sample the flow makes from
it, train again on those pairs; the new flow's paths are straighter, so fewer Euler steps suffice. The references
live here (the package has no reflow): the exact velocity field of a mixture of isotropic Gaussians with equal
weights (a finite point set when σ = 0), Liu et al.'s straightness S = E ∫ ‖(X_1 − X_0) − v(X_t, t)‖² dt measured
along the Euler path, and the coupling. Time runs as everywhere in the course: t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import torch

from minidit.assignments.common import judge_times, record_velocity
from minidit.grading.checks import Answer, Check, randn

NAME = "A10_reflow"
TITLE = "Reflow on a 2-D toy: straighter paths, one-step samples"
DISABLED: list[str] = []  # the package has no reflow, straightness or exact mixture field to delegate to

MEANS = torch.tensor([[-2.0, 1.5], [2.0, 1.5], [0.0, -2.0]])
SIGMA = 0.25


def mixture_velocity(x: torch.Tensor, t: torch.Tensor, means: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[noise − x0 | x_t = x] for data ~ (1/K)·Σ_k N(means_k, σ²I) and x_t = (1 − t)·x0 + t·noise (reference)."""
    x, means = x.double(), means.double()
    tb = t.double()[:, None, None]  # (B, 1, 1)
    d = x[:, None, :] - (1 - tb) * means[None]  # (B, K, D): x − E[x_t | k]
    var = (1 - tb) ** 2 * sigma**2 + tb**2  # Var[x_t | k] per coordinate
    w = torch.softmax(-(d**2).sum(-1, keepdim=True) / (2 * var), dim=1)  # (B, K, 1): p(k | x_t)
    eps = tb / var * d  # E[noise | x_t, k]
    x0 = means[None] + (1 - tb) * sigma**2 / var * d  # E[x0 | x_t, k]
    return (w * (eps - x0)).sum(1).float()


def _field_cases(exact_velocity, cases) -> list:
    return [exact_velocity(x, t, m, s) for x, t, m, s in cases()]


def _mixture_cases() -> list:
    t = torch.tensor([1.0, 0.7, 0.3, 0.05])
    return [(1.5 * randn(1, 4, 2), t, MEANS, SIGMA), (randn(2, 4, 2), t.flip(0), MEANS, 0.6)]


def _point_set_cases() -> list:
    t = torch.tensor([1.0, 0.5, 0.2])
    return [(randn(3, 3, 2), t, MEANS, 0.0),  # a finite point set (σ = 0)
            (randn(4, 3, 3), t, randn(5, 4, 3), 0.3)]  # 4 Gaussians in 3-D


def _field_answer(cases) -> Answer:
    def x0_minus_noise(x, t, m, s):
        return -mixture_velocity(x, t, m, s)

    def uniform_weights(x, t, m, s):  # every component weighted 1/K, whatever x
        tb = t[:, None, None]
        d = x[:, None, :] - (1 - tb) * m[None]
        var = (1 - tb) ** 2 * s**2 + tb**2
        return (tb / var * d - (m[None] + (1 - tb) * s**2 / var * d)).mean(1)

    def noise_only_variance(x, t, m, s):  # Var[x_t | k] = t²: the data's spread left out of the variance only
        tb = t[:, None, None]
        d = x[:, None, :] - (1 - tb) * m[None]
        var = tb**2
        w = torch.softmax(-(d**2).sum(-1, keepdim=True) / (2 * var), dim=1)
        return (w * (tb / var * d - (m[None] + (1 - tb) * s**2 / var * d))).sum(1)

    def no_spread(x, t, m, s):  # σ = 0 everywhere: the field of the means alone
        return mixture_velocity(x, t, m, 0.0)

    return Answer(_field_cases(mixture_velocity, cases), {
        "the sign is flipped: the velocity is E[noise − x0 | x_t], which points from the data to the noise":
            lambda: _field_cases(x0_minus_noise, cases),
        "every component gets weight 1/K: weigh each by how likely it is to have produced x_t (Bayes' rule)":
            lambda: _field_cases(uniform_weights, cases),
        "the spread σ of each component is missing from the variance: Var[x_t | k] = (1 − t)²σ² + t²":
            lambda: _field_cases(noise_only_variance, cases),
        "the spread σ of each component is ignored: the field is that of the means alone (σ = 0)":
            lambda: _field_cases(no_spread, cases)})


def _far_inputs() -> tuple:
    """Points far from every component (|x| ≈ 40) at small t: the weights must be computed without overflow."""
    return torch.tensor([[40.0, 0.0], [0.0, -40.0], [30.0, 30.0]]), torch.tensor([0.05, 0.1, 0.02]), MEANS, SIGMA


# ---- straightness -------------------------------------------------------------------------------------------------
def straightness_reference(velocity, noise: torch.Tensor, steps: int) -> float:
    """Mean over the Euler steps and the samples of ‖v_i − (noise − x_final)‖² (summed over coordinates)."""
    x, velocities = noise, []
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        v = velocity(x, t_cur.expand(x.shape[0]))
        velocities.append(v)
        x = x + (t_next - t_cur) * v
    line = noise - x  # the constant velocity of the straight path from the noise to where it ended
    return float(torch.stack([((v - line) ** 2).sum(1).mean() for v in velocities]).mean())


def _rotation(x, t):
    """A field whose paths bend: a rotation of x plus a drift that depends on t."""
    return torch.stack([-x[:, 1], x[:, 0]], dim=1) + t[:, None] * torch.tensor([1.0, -0.5])


def _straightness_cases(straightness) -> list:
    return [float(straightness(lambda x, t: torch.ones_like(x) * torch.tensor([0.5, -2.0]), randn(6, 5, 2), 4)),
            float(straightness(_rotation, randn(7, 6, 2), 5)),
            float(straightness(lambda x, t: x * (1 + t[:, None]), randn(8, 4, 3), 3))]


def _straightness_answer() -> Answer:
    def line_from_first(velocity, noise, steps):  # ‖v_i − v_0‖² instead of the straight line's velocity
        ts = torch.linspace(1.0, 0.0, steps + 1)
        x, vs = noise, []
        for a, b in zip(ts[:-1], ts[1:]):
            vs.append(velocity(x, a.expand(x.shape[0])))
            x = x + (b - a) * vs[-1]
        return float(torch.stack([((v - vs[0]) ** 2).sum(1).mean() for v in vs]).mean())

    return Answer(_straightness_cases(straightness_reference), {
        "the straight path's velocity is noise − x_final (where the sample started minus where it ended), the "
        "same for every step": lambda: _straightness_cases(line_from_first)})


def _straightness_calls(straightness) -> list:
    velocity = record_velocity(_rotation)
    straightness(velocity, randn(9, 3, 2), 4)
    return velocity.calls


# ---- the reflow coupling ------------------------------------------------------------------------------------------
def _euler(velocity, noise, steps):
    x, ts = noise, torch.linspace(1.0, 0.0, steps + 1)
    for a, b in zip(ts[:-1], ts[1:]):
        x = x + (b - a) * velocity(x, a.expand(x.shape[0]))
    return x


def _pairs_probe(reflow_pairs) -> list:
    noise = randn(10, 6, 2)
    x0, paired = reflow_pairs(_rotation, noise.clone(), 4)
    return [x0, paired]


def _pairs_answer() -> Answer:
    noise = randn(10, 6, 2)
    x0 = _euler(_rotation, noise, 4)
    return Answer([x0, noise], {
        "the pairs come in the wrong order: return (x0, noise), the order of interpolate(x0, noise, t)": [noise, x0]})


def _pairs_grad_probe(reflow_pairs) -> dict:
    """With a velocity that has parameters (a network), the pairs are training data: no graph attached."""
    weight = torch.nn.Parameter(torch.tensor([[0.5, -1.0], [1.0, 0.3]]))
    x0, noise = reflow_pairs(lambda x, t: x @ weight.T * t[:, None], randn(11, 4, 2), 3)
    return {"x0_requires_grad": bool(x0.requires_grad), "noise_requires_grad": bool(noise.requires_grad)}


def _judge_pairs(got, want: Answer) -> str | None:
    msg = want.explain(got)
    if msg is None or not isinstance(got, list) or len(got) != 2:
        return msg
    noise = randn(10, 6, 2)
    if isinstance(got[1], torch.Tensor) and got[1].shape == noise.shape and not torch.allclose(got[1].float(), noise):
        return ("the second element must be the very noise the samples were made from (the coupling), unchanged; "
                f"{msg}")
    return msg


CHECKS = [
    Check("exact_velocity: a mixture of 3 Gaussians in 2-D (σ = 0.25 and 0.6), t from 1 down to 0.05", points=2,
          probe=lambda exact_velocity: _field_cases(exact_velocity, _mixture_cases),
          expect=lambda: _field_answer(_mixture_cases), atol=1e-4, rtol=1e-3),
    Check("exact_velocity: a finite point set (σ = 0) and a mixture in 3-D", points=1,
          probe=lambda exact_velocity: _field_cases(exact_velocity, _point_set_cases),
          expect=lambda: _field_answer(_point_set_cases), atol=1e-4, rtol=1e-3),
    Check("exact_velocity: finite for points far from every component (weights computed without overflow)", points=1,
          probe=lambda exact_velocity: exact_velocity(*_far_inputs()), expect=lambda: mixture_velocity(*_far_inputs()),
          atol=1e-3, rtol=1e-3),
    Check("straightness: mean over steps and samples of ‖v_i − (noise − x_final)‖² (0 for a constant field)",
          points=2, probe=_straightness_cases, expect=_straightness_answer, atol=1e-4, rtol=1e-4),
    Check("straightness: one velocity call per Euler step, t of shape (B,) at t = 1, 0.75, 0.5, 0.25", points=1,
          probe=_straightness_calls, expect=lambda: None,
          judge=lambda calls, _: judge_times(calls, [1.0, 0.75, 0.5, 0.25], 3)),
    Check("reflow_pairs: (x0, noise) with x0 the Euler endpoint of that same noise", points=2,
          probe=_pairs_probe, expect=_pairs_answer, judge=_judge_pairs),
    Check("reflow_pairs: the pairs carry no autograd graph (they are training data)", points=1,
          probe=_pairs_grad_probe, expect=lambda: {"x0_requires_grad": False, "noise_requires_grad": False}),
]
