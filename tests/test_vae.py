"""The VAE: reparameterisation, KL, padding and shapes, the latent scale, training, checkpoints, shipped weights."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl

from minidit.checkpoint import CheckpointError, weights_path
from minidit.cli import vae_dataset
from minidit.pipeline import train_vae
from minidit.vae import (
    VAE,
    VAEConfig,
    compute_scale,
    evaluate_vae,
    kl_divergence,
    load_vae,
    psnr,
    reconstruct,
    reparameterize,
    save_vae,
    vae_loss,
)

TINY = dict(base_channels=8, max_channels=16)


def test_kl_matches_the_closed_form_of_torch_distributions():
    mean, logvar = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    want = torch_kl(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(kl_divergence(mean, logvar), want, atol=1e-5)
    assert torch.equal(kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))  # q = prior ⇒ 0


def test_reparameterisation_has_the_right_mean_and_standard_deviation():
    mean = torch.full((200_000,), 1.5)
    logvar = torch.full((200_000,), math.log(0.25))  # σ = 0.5 (a σ² / σ mix-up gives 0.25 or 1/√…)
    z = reparameterize(mean, logvar)
    assert z.mean().item() == pytest.approx(1.5, abs=0.01)
    assert z.std().item() == pytest.approx(0.5, abs=0.01)


def test_reparameterisation_passes_gradients_to_mean_and_logvar():
    mean = torch.tensor([0.3], requires_grad=True)
    logvar = torch.tensor([0.8], requires_grad=True)
    eps = torch.tensor([1.7])
    z = reparameterize(mean, logvar, eps)
    z.backward()
    assert z.item() == pytest.approx(0.3 + math.exp(0.4) * 1.7)
    assert mean.grad.item() == pytest.approx(1.0)
    assert logvar.grad.item() == pytest.approx(0.5 * math.exp(0.4) * 1.7)  # dz/dlogvar = ½σε


@pytest.mark.parametrize("factor,grid", [(2, 16), (4, 8), (8, 4)])
def test_shapes_and_padding(factor, grid):
    cfg = VAEConfig(factor=factor, latent_channels=3, **TINY)
    vae = VAE(cfg)
    seen = []
    vae.encoder[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (2, 3, grid, grid) and cfg.latent_shape == (3, grid, grid)
    assert cfg.values_kept == 3 * grid * grid
    padded = seen[0]
    assert padded.shape == (2, 1, 32, 32) and torch.equal(padded[..., 2:30, 2:30], x)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (padded[..., border] == -1).all()  # background, not zeros
    recon, _, _ = vae(x)
    assert recon.shape == x.shape


def test_config_validation():
    with pytest.raises(ValueError, match="factor=3"):
        VAEConfig(factor=3)
    with pytest.raises(ValueError, match="factor"):
        VAEConfig(pad=0, factor=8)  # 28 is not divisible by 8
    with pytest.raises(ValueError, match="kl_weight"):
        VAEConfig(kl_weight=-1)
    vae = VAE(VAEConfig(**TINY))
    with pytest.raises(ValueError, match=r"the VAE's images are \(B, 1, 28, 28\), got torch.float32 \(2, 1, 32, 32\)"):
        vae.encode(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"the VAE's latents are \(B, 4, 8, 8\), got torch.float32 \(2, 4, 4, 4\)"):
        vae.decode(torch.zeros(2, 4, 4, 4))


def test_loss_is_mse_plus_weighted_kl_per_pixel():
    vae = VAE(VAEConfig(kl_weight=0.01, **TINY))
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    noise = torch.randn(4, *vae.config.latent_shape)
    out = vae_loss(vae, x, noise)
    mean, logvar = vae.encode(x)
    recon = vae.decode(mean + (0.5 * logvar).exp() * noise)
    kl = (0.5 * (mean**2 + logvar.exp() - 1 - logvar)).flatten(1).sum(1).mean()
    assert out["mse"].item() == pytest.approx(F.mse_loss(recon, x).item(), rel=1e-5)
    assert out["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((F.mse_loss(recon, x) + 0.01 * kl / 784).item(), rel=1e-5)
    # an explicit kl_weight (what the Trainer passes when the VAE is wrapped) replaces the config's
    other = vae_loss(vae, x, noise, kl_weight=1.0)["loss"]
    assert other.item() == pytest.approx((F.mse_loss(recon, x) + kl / 784).item(), rel=1e-5)


def test_scale_makes_the_training_latents_unit_std():
    vae = VAE(VAEConfig(**TINY)).eval()
    x = torch.rand(64, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        std = vae.encode(x)[0].std().item()
    scale = compute_scale(vae, x, batch_size=16)
    assert scale == pytest.approx(1 / std, rel=1e-4) and vae.scale.item() == pytest.approx(1 / std, rel=1e-4)
    z = vae.encode_latents(x)
    assert z.std().item() == pytest.approx(1.0, rel=1e-4)
    # decode_latents undoes the scale: decode(z / scale)
    assert torch.allclose(vae.decode_latents(z), vae.decode(z / scale).clamp(-1, 1), atol=1e-5)


def test_training_reduces_reconstruction_error_and_checkpoints_round_trip(tmp_path):
    from minidit.data import mnist_tensors

    x = mnist_tensors("test")[0][::16]  # 63 real digits
    cfg = VAEConfig(factor=4, latent_channels=2, **TINY)
    torch.manual_seed(0)
    untrained = F.mse_loss(reconstruct(VAE(cfg), x), x).item()
    vae, info = train_vae(cfg, x, steps=60, batch_size=32, lr=3e-3, progress=False)
    assert not vae.training
    assert F.mse_loss(reconstruct(vae, x), x).item() < 0.6 * untrained
    assert info["steps"] == 60 and info["train_images"] == 63 and info["final_loss"] > 0
    assert info["scale"] == pytest.approx(vae.scale.item()) and info["posterior_std"] > 0
    assert vae.encode_latents(x).std().item() == pytest.approx(1.0, rel=1e-3)  # the scale is set after training
    save_vae(tmp_path / "v.safetensors", vae, info)
    meta = json.loads((tmp_path / "v.json").read_text())
    assert meta["kind"] == "vae" and meta["config"]["factor"] == 4
    again = load_vae(tmp_path / "v.safetensors")
    assert again.scale.item() == vae.scale.item()  # the scale travels with the weights, in fp32
    assert torch.allclose(again.encode(x)[0], vae.encode(x)[0], atol=2e-2)  # fp16 weights
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_vae(tmp_path / "missing.safetensors")


def test_psnr():
    x = torch.zeros(2, 1, 4, 4)
    assert psnr(x + 0.2, x) == pytest.approx(10 * math.log10(4 / 0.04))
    with pytest.raises(ValueError):
        psnr(x, torch.zeros(2, 1, 4, 5))


SHIPPED = ["vae_mnist_f4c4", "vae_shapes_f4c4"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_vae_reconstructs_held_out_images_at_its_stated_psnr(name):
    meta = json.loads(weights_path(name).with_suffix(".json").read_text())
    vae = load_vae(name)
    x, labels = vae_dataset(meta["dataset"], "test")
    got = psnr(reconstruct(vae, x), x)
    assert got == pytest.approx(meta["held_out"]["psnr"], abs=0.05)
    assert weights_path(name).stat().st_size < 3e6
    if name == "vae_mnist_f4c4":  # the digits stay readable: the classifier's accuracy barely drops
        m = evaluate_vae(vae, x, labels)
        assert m["psnr"] == pytest.approx(got) and m["values_kept"] == 4 * 8 * 8 and m["pixels"] == 784
        assert m["classifier_accuracy_reconstructed"] > m["classifier_accuracy_original"] - 0.02
