"""A6 (VAE) and A7 (DDPM): each known-wrong implementation (wrong variance, sign, time direction, KL sign, scale
factor) loses the check it should, and the checks' references agree with independent closed forms.

Full marks for the solutions and 0 for the exercises are tested for every assignment in tests/test_grading.py.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from minidit import ddpm, vae
from minidit.assignments import a6_vae, a7_ddpm
from minidit.grading import Grader

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def grader():
    with Grader(memory_mb=1024) as g:
        yield g


def variant(tmp_path: Path, name: str, replacements: list[tuple[str, str]]) -> Path:
    """The solution notebook with (old, new) replacements in its code cells (each old occurs exactly once)."""
    nb = json.loads((ROOT / "solutions" / f"{name}.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for old, new in replacements:
        srcs = ["".join(c["source"]) for c in code]
        assert sum(s.count(old) for s in srcs) == 1, f"{old!r} must occur once in solutions/{name}.ipynb"
        for c, s in zip(code, srcs):
            c["source"] = s.replace(old, new)
    path = tmp_path / f"{name}.ipynb"
    path.write_text(json.dumps(nb))
    return path


# label → (replacements in the solution, the check (name prefix) it must lose)
WRONG = {
    "A6_vae": {
        "log-variance used as σ": (
            [("    return mean + torch.exp(0.5 * logvar) * noise\n", "    return mean + logvar * noise\n")],
            "reparameterize: z = mean"),
        "variance used as σ": (
            [("    return mean + torch.exp(0.5 * logvar) * noise\n", "    return mean + torch.exp(logvar) * noise\n")],
            "reparameterize: z = mean"),
        "sample detached from the graph": (
            [("    return mean + torch.exp(0.5 * logvar) * noise\n",
              "    return (mean + torch.exp(0.5 * logvar) * noise).detach().requires_grad_()\n")],
            "reparameterize: gradients"),
        "fixed noise when none is given": (
            [("        noise = torch.randn_like(mean)\n", "        noise = torch.ones_like(mean)\n")],
            "reparameterize: without noise"),
        "KL sign flipped": (
            [("    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)\n",
              "    kl = -0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)\n")],
            "kl_divergence"),
        "KL with + log σ²": (
            [("    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)\n",
              "    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 + logvar)\n")],
            "kl_divergence"),
        "KL averaged instead of summed": (
            [("    return kl.flatten(1).sum(1)  # (B,)\n", "    return kl.flatten(1).mean(1)\n")],
            "kl_divergence"),
        "scale = std instead of 1 / std": (
            [("    return 1.0 / latents.float().std()\n", "    return latents.float().std()\n")],
            "latent_scale: 1 / std"),
        "scale = 1 / variance": (
            [("    return 1.0 / latents.float().std()\n", "    return 1.0 / latents.float().var()\n")],
            "latent_scale"),
    },
    "A7_ddpm": {
        "ᾱ as a cumulative product of β": (
            [("    return torch.cumprod(1 - betas, dim=0)\n", "    return 1 - torch.cumprod(betas, dim=0)\n")],
            "alphas_cumprod"),
        "q_sample with variances as coefficients (wrong variance)": (
            [("    return a.sqrt() * x0 + (1 - a).sqrt() * noise\n", "    return a * x0 + (1 - a) * noise\n")],
            "q_sample: keeps unit variance"),
        "q_sample with reversed time (ᾱ_{T−1−k})": (
            [("    a = alphas_cumprod[k].reshape(",
              "    a = alphas_cumprod[alphas_cumprod.shape[0] - 1 - k].reshape(")],
            "q_sample: x_k"),
        "DDIM x0 estimate with the wrong sign": (
            [("    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)\n",
              "    x0 = (x + math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)\n")],
            "ddim_step"),
        "DDIM step with ᾱ_t and ᾱ_prev swapped (time direction)": (
            [("    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps\n",
              "    x0 = (x - math.sqrt(1 - a_prev) * eps) / math.sqrt(a_prev + 1e-12)\n"
              "    return math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps\n")],
            "ddim_step"),
        "sampling from the least noisy step up": (
            [("    for j, k in enumerate(ks):\n", "    ks = ks[::-1]\n    for j, k in enumerate(ks):\n")],
            "ddim_sample: one call"),
        "model called with the integer step instead of k / T": (
            [("torch.full((x.shape[0],), k / T)", "torch.full((x.shape[0],), float(k))")],
            "ddim_sample: one call"),
        "last step re-noises instead of returning x0": (
            [("if j + 1 < len(ks) else 1.0\n", "if j + 1 < len(ks) else alphas_cumprod[0].item()\n")],
            "ddim_sample: matches"),
    },
}
CASES = [(name, label) for name, wrongs in WRONG.items() for label in wrongs]


@pytest.mark.parametrize(("name", "label"), CASES, ids=[f"{n.split('_')[0]}-{lab}" for n, lab in CASES])
def test_known_wrong_implementation_fails(grader, tmp_path, name, label):
    replacements, expected = WRONG[name][label]
    results = grader.grade(variant(tmp_path, name, replacements), assignment=name)
    lost = [t["name"] for t in results["tests"] if t["score"] < t["max_score"]]
    assert lost, f"{name}: '{label}' scored full marks"
    assert any(n.startswith(expected) for n in lost), f"{name}: '{label}' lost {lost}, not '{expected}…'"


# ---- the references the checks compare with, against independent closed forms ---------------------------------
def test_a6_references_match_closed_forms():
    mean, logvar = a6_vae._posterior()
    noise = torch.randn(mean.shape)
    assert torch.allclose(vae.reparameterize(mean, logvar, noise), mean + logvar.exp().sqrt() * noise)
    # KL(N(μ, σ²) ‖ N(0, 1)) per value from the textbook form log(1/σ) + (σ² + μ²)/2 − ½, summed per sample
    sigma = logvar.exp().sqrt()
    textbook = (torch.log(1 / sigma) + (sigma**2 + mean**2) / 2 - 0.5).flatten(1).sum(1)
    assert torch.allclose(vae.kl_divergence(mean, logvar), textbook, atol=1e-5)
    assert a6_vae._scale_expect() == pytest.approx(1 / a6_vae._latents().std().item())
    assert not math.isclose(a6_vae._scale_expect(), 1.0, abs_tol=0.2)  # far from 1: std vs 1/std differ


def test_a7_references_match_closed_forms():
    abar = a7_ddpm._abar()
    naive = [1.0]
    for b in a7_ddpm._betas().tolist():  # ᾱ_k by a plain loop
        naive.append(naive[-1] * (1 - b))
    assert torch.allclose(abar, torch.tensor(naive[1:], dtype=torch.float64))
    a = float(abar[250])
    assert 0.2 < a < 0.8  # the variance check's step separates √ᾱ from ᾱ
    # DDIM with the true noise maps q_sample(k) onto q_sample(k') (and onto x0 when ᾱ_prev = 1)
    x0, eps = torch.randn(2, 1, 3, 3, dtype=torch.float64), torch.randn(2, 1, 3, 3, dtype=torch.float64)
    sched = ddpm.DDPMSchedule("linear")
    x600 = ddpm.q_sample(sched, x0, torch.tensor([600, 600]), eps)
    x200 = ddpm.q_sample(sched, x0, torch.tensor([200, 200]), eps)
    assert torch.allclose(a7_ddpm._ddim_step_reference(x600, eps, float(abar[600]), float(abar[200])), x200)
    assert torch.allclose(a7_ddpm._ddim_step_reference(x600, eps, float(abar[600]), 1.0), x0)
