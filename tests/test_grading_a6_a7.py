"""A6 (VAE) and A7 (DDPM): each known-wrong implementation (wrong variance, sign, time direction, KL sign, scale
factor, dtype, shape) loses the check it should, with feedback that names it, and fails a self-check of its
notebook; the checks' references agree with independent closed forms.

Full marks for the solutions and 0 for the exercises are tested for every assignment in tests/test_grading.py.
"""

import math

import pytest
import torch
from test_grading import assert_known_wrong, variant

from minidit import ddpm, vae
from minidit.assignments import a6_vae, a7_ddpm
from minidit.grading import Grader


@pytest.fixture(scope="module")
def grader():
    with Grader(memory_mb=1024) as g:
        yield g


# label → (replacements in the solution, the check (name prefix) it must lose[, words its feedback must contain])
WRONG = {
    "A6_vae": {
        "log-variance used as σ": (
            [("    return mean + torch.exp(0.5 * logvar) * noise\n", "    return mean + logvar * noise\n")],
            "reparameterize: z = mean", "log-variance is used as the standard deviation"),
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
            "kl_divergence", "the sign is flipped"),
        "KL with + log σ²": (
            [("    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)\n",
              "    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 + logvar)\n")],
            "kl_divergence", "wrong sign: it is − log σ²"),
        "KL averaged instead of summed": (
            [("    return kl.flatten(1).sum(1)  # (B,)\n", "    return kl.flatten(1).mean(1)\n")],
            "kl_divergence", "averaged over each sample's values"),
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
            "alphas_cumprod", "not 1 minus the product"),
        "ᾱ of the linear schedule whatever the betas": (
            [("    return torch.cumprod(1 - betas, dim=0)\n",
              "    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), dim=0)\n")],
            "alphas_cumprod"),
        "q_sample with variances as coefficients (wrong variance)": (
            [("    return a.sqrt() * x0 + (1 - a).sqrt() * noise\n", "    return a * x0 + (1 - a) * noise\n")],
            "q_sample: keeps unit variance"),
        "q_sample with reversed time (ᾱ_{T−1−k})": (
            [("    a = alphas_cumprod[k].reshape(",
              "    a = alphas_cumprod[alphas_cumprod.shape[0] - 1 - k].reshape(")],
            "q_sample: x_k", "time is reversed"),
        "q_sample with ᾱ off by one": (
            [("    a = alphas_cumprod[k].reshape(", "    a = alphas_cumprod[k - 1].reshape(")],
            "q_sample: x_k", "off by one"),
        # the mistakes that passed the old self-checks or the old grader
        "q_sample returns float64 for float32 images (the old hint)": (
            [("    a = alphas_cumprod[k].reshape(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)  # (B, 1, …)\n",
              "    a = alphas_cumprod[k].reshape(-1, *[1] * (x0.ndim - 1))\n")],
            "q_sample: x_k has the dtype", "float32 images came back as float64"),
        "q_sample for 4-D images only": (
            [("    a = alphas_cumprod[k].reshape(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)  # (B, 1, …)\n",
              "    a = alphas_cumprod[k].reshape(-1, 1, 1, 1).to(x0.dtype)\n")],
            "q_sample: any shape", "expected shape (3, 7)"),
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
            "ddim_sample: one call", "not the integer step k"),
        "last step re-noises instead of returning x0": (
            [("if j + 1 < len(ks) else 1.0\n", "if j + 1 < len(ks) else alphas_cumprod[0].item()\n")],
            "ddim_sample: matches"),
    },
}
CASES = [(name, label) for name, wrongs in WRONG.items() for label in wrongs]


@pytest.mark.parametrize(("name", "label"), CASES, ids=[f"{n.split('_')[0]}-{lab}" for n, lab in CASES])
def test_known_wrong_implementation_fails(grader, tmp_path, name, label):
    replacements, expected, *phrase = WRONG[name][label]
    results = grader.grade(variant(tmp_path, name, replacements), assignment=name)
    assert_known_wrong(results, name, label, expected, *phrase)


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
    assert torch.equal(abar, ddpm.DDPMSchedule("linear").alphas_cumprod)  # the package's schedule, computed here
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
