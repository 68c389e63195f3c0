"""A DiT on VAE latents: configs that match the latent grid, training on scaled latents, sampling then decoding."""

import pytest
import torch

from minidit.ddpm import DDPMSchedule
from minidit.models import DiT
from minidit.train import TrainConfig, Trainer
from minidit.vae import VAE, VAEConfig, compute_scale, latent_dit_config, sample_images


@pytest.fixture
def vae():
    v = VAE(VAEConfig(factor=4, latent_channels=3, base_channels=8, max_channels=16)).eval()
    compute_scale(v, torch.rand(32, 1, 28, 28) * 2 - 1)
    return v


@pytest.mark.parametrize("patch,tokens", [(1, 64), (2, 16)])
def test_latent_dit_config_matches_the_latent_grid(vae, patch, tokens):
    cfg = latent_dit_config(vae.config, patch_size=patch, dim=32, depth=1, num_heads=2)
    assert (cfg.input_size, cfg.in_channels, cfg.num_tokens) == (8, 3, tokens)


def test_train_on_latents_then_sample_and_decode(vae):
    x = torch.rand(32, 1, 28, 28) * 2 - 1
    z = vae.encode_latents(x)
    assert z.shape == (32, 3, 8, 8)
    assert torch.allclose(z, vae.encode(x)[0] * vae.scale)  # z = scale · posterior mean
    model = DiT(latent_dit_config(vae.config, patch_size=2, dim=32, depth=1, num_heads=2))
    tr = Trainer(model, z, torch.arange(32) % 10, TrainConfig(steps=3, batch_size=8, log_every=1))
    tr.run(progress=False)
    assert len(tr.history) == 3
    labels = torch.arange(4)
    imgs = sample_images(tr.ema, vae, labels, steps=2)
    assert imgs.shape == (4, 1, 28, 28) and imgs.min() >= -1 and imgs.max() <= 1


def test_sampling_decodes_what_the_sampler_returns(vae):
    """A fresh DiT predicts velocity 0, so Euler returns the initial noise: the images are decode(noise / scale)."""
    model = DiT(latent_dit_config(vae.config, patch_size=1, dim=32, depth=1, num_heads=2))
    noise = torch.randn(3, 3, 8, 8)
    imgs = sample_images(model, vae, torch.arange(3), steps=3, noise=noise)
    assert torch.allclose(imgs, vae.decode(noise / vae.scale).clamp(-1, 1), atol=1e-6)
    # DDPM with ε ≡ 0: DDIM maps x_T to x0 = x_T / √ᾱ_T exactly (no clipping in latent space)
    sched = DDPMSchedule()
    out = sample_images(model, vae, torch.arange(3), objective="ddpm", schedule=sched, steps=1, method="ddim",
                        noise=noise)
    want = vae.decode(noise / sched.alphas_cumprod[-1].sqrt().float() / vae.scale).clamp(-1, 1)
    assert torch.allclose(out, want, atol=1e-4)


def test_shape_mismatch_is_reported(vae):
    from minidit.models import get_config

    with pytest.raises(ValueError, match="latent grid"):
        sample_images(DiT(get_config("mnist-tiny")), vae, torch.arange(2))
