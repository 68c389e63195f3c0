"""Pieces the assignments' checks share: small fixed models whose mistakes show up, and a recorder of model calls.

Everything here runs on both sides: in the sandbox (probes call the student's code with these models) and in the
grader (`expect` computes the reference answer with the same models and inputs).
"""

from __future__ import annotations

import torch
from torch import nn

from minidit.grading.checks import randn


class ToyVelocity(nn.Module):
    """A fixed, untrained model v(x, t, y) for inputs (B, C, …) of any number of axes, C = `channels`.

    It mixes the channels, depends on t and adds a per-label vector, so that guiding only some channels, flipping
    time or mixing up the labels changes its output. The null label is `num_classes`.
    """

    def __init__(self, channels: int = 4, num_classes: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.null_label = num_classes
        self.mix = nn.Parameter(torch.randn(channels, channels, generator=g) / channels**0.5)
        self.time = nn.Parameter(torch.randn(channels, generator=g))
        self.label = nn.Parameter(torch.randn(num_classes + 1, channels, generator=g))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shape = (-1, x.shape[1], *[1] * (x.ndim - 2))  # a (B, C) or (C,) vector broadcast over the other axes
        h = torch.einsum("oc,bc...->bo...", self.mix, x)
        tb = t.reshape(-1, *[1] * (x.ndim - 1))
        return torch.tanh(h) * (1 + tb * self.time.reshape(shape)) + (1 - tb) * self.label[y].reshape(shape)


class Recorder(nn.Module):
    """Wraps a model v(x, t, y) and records each call: batch size, the shape and values of t, the labels."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.calls = model, []
        self.null_label = getattr(model, "null_label", None)

    def forward(self, x, t, y):
        self.calls.append({"batch": int(x.shape[0]), "t_shape": list(t.shape),
                           "t": [round(float(v), 6) for v in t.detach().reshape(-1)],
                           "y": [int(v) for v in y.detach().reshape(-1)]})
        return self.model(x, t, y)


def record_velocity(velocity):
    """A velocity function v(x, t) that records each call (batch size, shape and values of t) in `.calls`."""

    def recorded(x, t):
        recorded.calls.append({"batch": int(x.shape[0]), "t_shape": list(t.shape),
                               "t": [round(float(v), 6) for v in t.detach().reshape(-1)]})
        return velocity(x, t)

    recorded.calls = []
    return recorded


def judge_times(calls, want: list[float], batch: int, what: str = "the velocity") -> str | None:
    """A judge for recorded calls: one call per step, each with t of shape (batch,) holding the step's time."""
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        return f"expected the list of recorded calls, got {type(calls).__name__}"
    if len(calls) != len(want):
        return f"{what} was called {len(calls)} time(s); expected {len(want)}, one per step"
    for i, (call, t) in enumerate(zip(calls, want)):
        if call.get("t_shape") != [batch]:
            return (f"t must have one value per sample: expected shape ({batch},), got {tuple(call.get('t_shape'))} "
                    f"(call {i + 1})")
        if any(abs(v - t) > 1e-5 for v in call.get("t", [])):
            got = [c["t"][0] if c.get("t") else None for c in calls]
            hint = ""
            if [round(g, 4) for g in got if g is not None] == [round(x, 4) for x in want[1:] + [0.0]]:
                hint = ": each step is evaluated at its end instead of its start"
            elif got and got[0] is not None and abs(got[0] - want[-1]) < 1e-5:
                hint = ": time runs the wrong way (it must start at the noisiest time)"
            return f"expected the times {[round(x, 6) for x in want]}, got {got}{hint}"
    return None


def toy_inputs(seed: int, *shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two seeded tensors of the same shape (e.g. data and noise)."""
    return randn(seed, *shape), randn(seed + 1, *shape)


def judge_invariance(got, unchanged: str, changed: str, unchanged_msg: str, changed_msg: str) -> str | None:
    """A judge for {unchanged: max |Δ output|, changed: max |Δ output|}: the first must be ≈ 0, the second not.

    `unchanged_msg` may hold `{change}`, the size of the change that should not have happened."""
    if not isinstance(got, dict) or not all(isinstance(got.get(k), float) for k in (unchanged, changed)):
        return f"expected two numbers, got {got!r}"
    if got[unchanged] > 1e-5:
        return unchanged_msg.format(change=f"{got[unchanged]:.3g}")
    if got[changed] < 1e-5:
        return changed_msg
    return None


def judge_one_forward(calls, labels: list[int], times: list[float], null_label: int) -> str | None:
    """One model call on the doubled batch: every label once, B null labels, every time twice."""
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        return f"expected the list of recorded model calls, got {type(calls).__name__}"
    n = len(labels)
    if len(calls) != 1:
        sizes = [c.get("batch") for c in calls]
        return (f"expected one model call per guided prediction, got {len(calls)} (batch sizes {sizes}): put the "
                f"conditional and unconditional inputs in one batch of {2 * n}")
    call, want_y = calls[0], sorted(labels + [null_label] * n)
    if call.get("batch") != 2 * n or sorted(call.get("y", [])) != want_y:
        return f"expected one batch of {2 * n} with the labels {want_y} (in any order), got labels {call.get('y')}"
    if sorted(call.get("t", [])) != sorted(round(t, 6) for t in times * 2):
        return f"expected the times {times} twice (once per half of the batch), got {call.get('t')}"
    return None
