"""A6 — the VAE's three ingredients: the reparameterisation trick, the KL term and the latent scale factor.

References: `minidit.vae` (reparameterize, kl_divergence, compute_scale's 1 / std). The checks use fixed inputs
whose log-variances are far from 0, so that confusing σ, σ² and log σ² (or the KL's sign) shows up.
"""

from __future__ import annotations

import torch

from minidit import vae
from minidit.grading.checks import Answer, Check, randn

NAME = "A6_vae"
TITLE = "VAE: reparameterisation, KL divergence and the latent scale factor"
DISABLED = ["minidit.vae:reparameterize", "minidit.vae:kl_divergence", "minidit.vae:compute_scale",
            "minidit.vae:vae_loss"]

B, C, S = 3, 4, 2  # batch, latent channels, latent grid size


def _posterior() -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar) (B, C, S, S) with log-variances spread over [−3, 1.5] (σ from 0.22 to 2.1)."""
    return randn(1, B, C, S, S), torch.linspace(-3.0, 1.5, B * C * S * S).reshape(B, C, S, S)


def _reparam_probe(reparameterize) -> torch.Tensor:
    mean, logvar = _posterior()
    return reparameterize(mean, logvar, randn(2, B, C, S, S))


def _reparam_expect() -> Answer:
    mean, logvar = _posterior()
    noise = randn(2, B, C, S, S)
    return Answer(vae.reparameterize(mean, logvar, noise), {
        "the log-variance is used as the standard deviation; σ = exp(½·logvar)": lambda: mean + logvar * noise,
        "the variance is used as the standard deviation; σ = exp(½·logvar), the square root of exp(logvar)":
            lambda: mean + logvar.exp() * noise})


def _grad_probe(reparameterize) -> dict:
    mean, logvar = (p.clone().requires_grad_(True) for p in _posterior())
    z = reparameterize(mean, logvar, randn(2, B, C, S, S))
    (z * randn(3, B, C, S, S)).sum().backward()
    return {"mean": mean.grad, "logvar": logvar.grad}


def _grad_expect() -> dict:
    mean, logvar = (p.clone().requires_grad_(True) for p in _posterior())
    (vae.reparameterize(mean, logvar, randn(2, B, C, S, S)) * randn(3, B, C, S, S)).sum().backward()
    return {"mean": mean.grad, "logvar": logvar.grad}


def _spread_probe(reparameterize) -> float:
    """The empirical std of 20,000 samples with σ = 0.5 (log σ² = log 0.25), noise drawn by the function itself."""
    torch.manual_seed(0)
    mean = torch.zeros(20_000, 1)
    logvar = torch.full((20_000, 1), float(torch.log(torch.tensor(0.25))))
    return float(reparameterize(mean, logvar).std())


def _kl_probe(kl_divergence) -> list:
    mean, logvar = _posterior()
    return [kl_divergence(mean, logvar), kl_divergence(torch.zeros(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)),
            kl_divergence(mean.flatten(1), logvar.flatten(1))]  # and (B, D) vectors


def _kl_expect() -> Answer:
    mean, logvar = _posterior()

    def cases(terms):
        kl = terms(mean, logvar)
        return [kl.flatten(1).sum(1), torch.zeros(2), kl.flatten(1).sum(1)]

    def averaged(m, lv):
        kl = 0.5 * (m**2 + lv.exp() - 1 - lv)
        return [kl.flatten(1).mean(1), torch.zeros(2), kl.flatten(1).mean(1)]

    return Answer([vae.kl_divergence(mean, logvar), torch.zeros(2), vae.kl_divergence(mean, logvar)], {
        "the sign is flipped: the KL is ≥ 0, ½·Σ(μ² + σ² − 1 − log σ²)":
            lambda: cases(lambda m, lv: -0.5 * (m**2 + lv.exp() - 1 - lv)),
        "the log-variance term has the wrong sign: it is − log σ²":
            lambda: cases(lambda m, lv: 0.5 * (m**2 + lv.exp() - 1 + lv)),
        "the KL is averaged over each sample's values; sum them (one KL per sample, in nats)":
            lambda: averaged(mean, logvar)})


def _latents() -> torch.Tensor:
    return randn(4, 64, C, S, S) * 3.0 + 0.5  # std ≈ 3: a scale of ≈ 1/3


def _scale_expect() -> float:
    return 1.0 / float(_latents().std())


def _scaled_std_probe(latent_scale) -> float:
    z = _latents()
    return float((z * latent_scale(z)).std())


CHECKS = [
    Check("reparameterize: z = mean + exp(½·logvar)·noise (σ, not σ² or log σ²)", points=2,
          probe=_reparam_probe, expect=_reparam_expect),
    Check("reparameterize: gradients flow into mean and logvar", points=1, probe=_grad_probe, expect=_grad_expect),
    Check("reparameterize: without noise given, samples have std σ (σ = 0.5)", points=1, probe=_spread_probe,
          expect=lambda: 0.5, atol=0.02, rtol=0.0),
    Check("kl_divergence: ½·Σ(μ² + σ² − 1 − log σ²) per sample (B,), 0 for N(0, I); latents and (B, D) vectors",
          points=3,
          probe=_kl_probe, expect=_kl_expect, atol=1e-4),
    Check("latent_scale: 1 / std of the latents", points=1,
          probe=lambda latent_scale: float(latent_scale(_latents())), expect=_scale_expect),
    Check("latent_scale: scaled latents have unit std", points=1, probe=_scaled_std_probe, expect=lambda: 1.0,
          atol=1e-4),
]
