"""A9 — classifier-free guidance: one batched forward, the guidance interval, and a scale sweep judged by a classifier.

References: `minidit.guidance.guided` (CFG with an interval), `minidit.sampling.sample` (Euler on SD3's shifted time
grid), the shipped classifier `minidit.metrics.load_classifier` and the shipped model `weights/mnist_dit`. The
toy checks use `ToyVelocity` (4 channels, null label 3) on images and points; the sweep check samples the shipped
model with a few steps, so that it runs in seconds.
"""

from __future__ import annotations

import torch

from minidit import flow, guidance, sampling
from minidit.assignments.common import Recorder, ToyVelocity, judge_one_forward, toy_inputs
from minidit.checkpoint import load_model, weights_path
from minidit.grading.checks import Answer, Check, compare, randn
from minidit.metrics import load_classifier

NAME = "A9_guidance"
TITLE = "Classifier-free guidance: one forward, the guidance interval, a measured sweep"
DISABLED = ["minidit.guidance:guided", "minidit.sampling:sample", "minidit.flow:euler_sample",
            "minidit.flow:heun_sample", "minidit.metrics:accuracy", "minidit.metrics:evaluate"]

B = 3
LABELS = [0, 2, 1]
INTERVAL = (0.25, 0.75)  # exact in float32, so that times at its ends test the ends (0.3 would be 0.3000000119)
TIMES = (0.125, 0.25, 0.5, 0.75, 0.875)  # below, at the lower bound, inside, at the upper bound, above


def _labels() -> torch.Tensor:
    return torch.tensor(LABELS)


def _at(t: float) -> torch.Tensor:
    return torch.full((B,), t)


def _guided_cases(guided_velocity) -> list:
    model, out = ToyVelocity(), []
    for shape in ((B, 4, 3, 3), (B, 4)):  # images and points
        x = toy_inputs(11, *shape)[0]
        out += [guided_velocity(model, _labels(), scale)(x, _at(0.6)) for scale in (0.0, 1.0, 2.5)]
    return out


def _guided_answer() -> Answer:
    def reference(model, y, scale, interval=None):
        return guidance.guided(model, y, scale, interval)

    def reversed_direction(model, y, scale, interval=None):
        null = torch.full_like(y, model.null_label)
        return lambda x, t: model(x, t, y) + scale * (model(x, t, null) - model(x, t, y))

    with torch.no_grad():
        return Answer(_guided_cases(reference), {
            "guidance points the wrong way: start from the unconditional prediction and move towards the "
            "conditional one, uncond + scale·(cond − uncond)": lambda: _guided_cases(reversed_direction)})


def _guided_calls(guided_velocity) -> list:
    rec = Recorder(ToyVelocity())
    guided_velocity(rec, _labels(), 3.0)(toy_inputs(12, B, 4, 3, 3)[0], _at(0.6))
    return rec.calls


def _interval_cases(guided_velocity) -> list:
    model, x = ToyVelocity(), toy_inputs(13, B, 4, 3, 3)[0]
    velocity = guided_velocity(model, _labels(), 4.0, INTERVAL)
    return [velocity(x, _at(t)) for t in TIMES]


def _interval_answer() -> Answer:
    def with_rule(rule):
        model, x, y = ToyVelocity(), toy_inputs(13, B, 4, 3, 3)[0], _labels()
        null = torch.full_like(y, model.null_label)
        out = []
        for t in TIMES:
            cond, uncond = model(x, _at(t), y), model(x, _at(t), null)
            out.append(rule(t, cond, uncond))
        return out

    lo, hi = INTERVAL

    def right(t, cond, uncond):
        return uncond + 4.0 * (cond - uncond) if lo <= t <= hi else cond

    with torch.no_grad():
        return Answer(with_rule(right), {
            "guidance is applied outside the interval instead of inside it": lambda: with_rule(
                lambda t, c, u: c if lo <= t <= hi else u + 4.0 * (c - u)),
            "the interval's ends are excluded: guide while lo ≤ t ≤ hi": lambda: with_rule(
                lambda t, c, u: u + 4.0 * (c - u) if lo < t < hi else c),
            "outside the interval the prediction must be the plain conditional one, not the unconditional one":
                lambda: with_rule(lambda t, c, u: u + 4.0 * (c - u) if lo <= t <= hi else u)})


def _outside_calls(guided_velocity) -> dict:
    calls = {}
    for name, scale, interval, t in (("outside the interval", 4.0, INTERVAL, 0.9), ("scale 1", 1.0, None, 0.5)):
        rec = Recorder(ToyVelocity())
        guided_velocity(rec, _labels(), scale, interval)(toy_inputs(14, B, 4)[0], _at(t))
        calls[name] = rec.calls
    return calls


def _judge_outside(got, _) -> str | None:
    if not isinstance(got, dict):
        return f"expected the recorded calls, got {type(got).__name__}"
    for name, calls in got.items():
        if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
            return f"expected the recorded calls, got {type(calls).__name__}"
        sizes = [c.get("batch") for c in calls]
        if sizes != [B]:
            return (f"{name}: expected ONE forward of the B = {B} conditional inputs (guidance is off there, so "
                    f"the unconditional half is wasted work), got batch sizes {sizes}")
        if calls[0].get("y") != LABELS:
            return f"{name}: the one forward must use the labels {LABELS}, got {calls[0].get('y')}"
    return None


# ---- sample_guided -----------------------------------------------------------------------------------------------
SAMPLE_CASES = ((5, 2.0, None, 1.0), (5, 3.0, INTERVAL, 3.0), (2, 0.0, None, 1.0))  # steps, scale, interval, shift


def _sample_cases(sample_guided) -> list:
    model, y = ToyVelocity(), _labels()
    return [sample_guided(model, y, toy_inputs(15, B, 4, 3, 3)[0], steps, scale, interval, shift)
            for steps, scale, interval, shift in SAMPLE_CASES]


@torch.no_grad()
def _sample_expect() -> list:
    model, y = ToyVelocity(), _labels()
    return [flow.euler_sample(guidance.guided(model, y, scale, interval), toy_inputs(15, B, 4, 3, 3)[0], steps, shift)
            for steps, scale, interval, shift in SAMPLE_CASES]


def _sample_calls(sample_guided) -> list:
    rec = Recorder(ToyVelocity())
    sample_guided(rec, _labels(), toy_inputs(16, B, 4, 3, 3)[0], 5, 4.0, INTERVAL, 1.0)  # t = 1, .8, .6, .4, .2
    return [{"batch": c["batch"], "t": c["t"][0] if c["t"] else None} for c in rec.calls]


def _judge_sample_calls(got, _) -> str | None:
    want = [{"batch": n, "t": t} for n, t in ((B, 1.0), (B, 0.8), (2 * B, 0.6), (2 * B, 0.4), (B, 0.2))]
    if not isinstance(got, list):
        return f"expected the recorded calls, got {type(got).__name__}"
    if len(got) != len(want):
        return f"expected {len(want)} model calls for 5 steps (one per step), got {len(got)}"
    if [round(c.get("t") or -1, 4) for c in got] != [w["t"] for w in want]:
        times = [c.get("t") for c in got]
        return f"expected the model at t = 1, 0.8, 0.6, 0.4, 0.2 (5 Euler steps, shift 1), got {times}"
    if [c.get("batch") for c in got] != [w["batch"] for w in want]:
        return (f"with the interval {INTERVAL}, expected batch sizes {[w['batch'] for w in want]} (2B only where "
                f"guidance is on), got {[c.get('batch') for c in got]}")
    return None


# ---- the classifier and the sweep ---------------------------------------------------------------------------------
def _judged_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Real test digits, some pushed out of [−1, 1] (the classifier's range), with a few labels made wrong."""
    from minidit.data import mnist_tensors

    x, y = mnist_tensors("test")
    x, y = x[:40].clone(), y[:40].clone()
    x[::2] = 3 * x[::2]  # out of range: clamped, they are crisp digits; unclamped, the classifier misreads many
    y[:8] = (y[:8] + 1) % 10  # eight wrong labels
    return x, y


def _accuracy_expect() -> Answer:
    x, y = _judged_images()
    clf = load_classifier()
    with torch.no_grad():
        right = float((clf(x.clamp(-1, 1)).argmax(1) == y).float().mean())
        unclamped = float((clf(x).argmax(1) == y).float().mean())
    return Answer(right, {"the images must be clamped to [−1, 1] (the classifier's range) before judging them":
                          unclamped} if abs(unclamped - right) > 1e-6 else {})


SWEEP_SCALES, SWEEP_STEPS, SWEEP_SHIFT = (0.0, 1.0, 3.0), 6, 3.0


def _sweep_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(10).repeat(2)  # two of each digit
    return labels, randn(17, len(labels), 1, 28, 28)


class _Starts(torch.nn.Module):
    """A model that predicts a zero velocity and records, at every call at t = 1 (where a sampling run starts),
    whether its inputs are the given noise: every row one of the noise's, every noise row there (in any order)."""

    null_label = 10

    def __init__(self, noise: torch.Tensor):
        super().__init__()
        self.noise, self.starts = noise.flatten(1).double(), []

    def forward(self, x, t, y):
        if abs(float(t.reshape(-1)[0]) - 1.0) < 1e-6:
            d = torch.cdist(x.detach().flatten(1).double(), self.noise)
            self.starts.append(bool(d.min(1).values.max() < 1e-5 and d.min(0).values.max() < 1e-5))
        return torch.zeros_like(x)


def _starts_probe(guidance_sweep) -> list:
    labels, noise = _sweep_inputs()
    model = _Starts(noise)
    guidance_sweep(model, SWEEP_SCALES, labels, noise.clone(), 2, 1.0)
    return model.starts


def _judge_starts(got, _) -> str | None:
    n = len(SWEEP_SCALES)
    if not isinstance(got, list):
        return f"expected the recorded sampling runs, got {type(got).__name__}"
    if len(got) != n:
        return (f"expected one sampling run per scale ({n} scales), each starting at t = 1; the model was called "
                f"{len(got)} time(s) at t = 1")
    bad = [i + 1 for i, ok in enumerate(got) if not ok]
    if bad:
        return (f"sampling run(s) {bad} of {n} did not start from the given noise: sample every scale from the same "
                "noise, so that only the guidance changes between them")
    return None


def _sweep_probe(guidance_sweep) -> dict:
    labels, noise = _sweep_inputs()
    model = load_model(weights_path("mnist_dit"))
    out = guidance_sweep(model, SWEEP_SCALES, labels, noise, SWEEP_STEPS, SWEEP_SHIFT)
    return {str(k): v for k, v in out.items()} if isinstance(out, dict) else out


@torch.no_grad()
def _sweep_expect() -> dict:
    labels, noise = _sweep_inputs()
    model, clf = load_model(weights_path("mnist_dit")), load_classifier()
    out = {}
    for scale in SWEEP_SCALES:
        x = sampling.sample(model, labels, steps=SWEEP_STEPS, shift=SWEEP_SHIFT, cfg_scale=scale, noise=noise)
        out[str(scale)] = float((clf(x.clamp(-1, 1)).argmax(1) == labels).float().mean())
    return out


def _judge_sweep(got, want) -> str | None:
    if isinstance(got, dict) and set(got) != set(want):
        return f"expected a dict with one accuracy per scale, keys {[float(k) for k in want]}, got keys {list(got)}"
    msg = compare(got, want, atol=0.1, rtol=0.0)  # two of 20 samples: the classifier may flip on a rounding error
    return None if msg is None else f"{msg} (accuracies per scale, expected {want})"


CHECKS = [
    Check("guided_velocity: uncond + scale·(cond − uncond) on every channel (scales 0, 1, 2.5; images and points)",
          points=2, probe=_guided_cases, expect=_guided_answer),
    Check("guided_velocity: ONE batched forward of 2B samples when guiding (each label once, B null labels)", points=1,
          probe=_guided_calls, expect=lambda: None,
          judge=lambda calls, _: judge_one_forward(calls, LABELS, [0.6] * B, 3)),
    Check("guided_velocity: the interval — guided while lo ≤ t ≤ hi (ends included), conditional outside", points=2,
          probe=_interval_cases, expect=_interval_answer),
    Check("guided_velocity: outside the interval and at scale 1, ONE forward of the B conditional inputs", points=1,
          probe=_outside_calls, expect=lambda: None, judge=_judge_outside),
    Check("sample_guided: Euler from t = 1 to 0 on the shifted time grid, with the guided velocity", points=2,
          probe=_sample_cases, expect=_sample_expect),
    Check("sample_guided: one model call per step; 2B inputs only where the interval switches guidance on", points=1,
          probe=_sample_calls, expect=lambda: None, judge=_judge_sample_calls),
    Check("class_accuracy: the share of images the package's classifier assigns to their label (clamped to [−1, 1])",
          points=1, probe=lambda class_accuracy: float(class_accuracy(*_judged_images())), expect=_accuracy_expect,
          atol=1e-6, timeout=60),
    Check("guidance_sweep: every scale sampled from the same given noise (only the guidance changes)", points=1,
          probe=_starts_probe, expect=lambda: None, judge=_judge_starts, timeout=60),
    Check("guidance_sweep: the shipped model's class accuracy at scales 0, 1 and 3 (6 steps, 20 digits)", points=1,
          probe=_sweep_probe, expect=_sweep_expect, judge=_judge_sweep, timeout=180),
]
