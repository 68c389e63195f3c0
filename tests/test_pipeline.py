"""minidit.pipeline: recipes (pixel space, or a shipped VAE's latents), building, training on latents, sampling then
decoding, autoguidance snapshots, and the VAE trainer."""

import copy
from dataclasses import replace

import pytest
import torch

from minidit.attention import AttentionModule
from minidit.ddpm import DDPMSchedule
from minidit.models import DiT, get_config
from minidit.pipeline import (
    RECIPES,
    GuideSnapshot,
    build_model,
    generate,
    get_recipe,
    recipe_vae,
    training_data,
    with_train_overrides,
)
from minidit.sampling import sample
from minidit.train import TrainConfig, Trainer
from minidit.vae import VAE, VAEConfig, compute_scale


def small_latent_recipe():
    r = get_recipe("latent")
    return replace(r, model=replace(r.model, dim=32, depth=1, num_heads=2))


def test_every_recipe_builds_and_matches_its_space():
    assert {"latent", "flagship", "mnist-s4", "tiny"} <= set(RECIPES)
    for name, r in RECIPES.items():
        model = build_model(r)
        vae = recipe_vae(r)
        if r.vae is None:
            assert vae is None and (r.model.in_channels, r.model.input_size) == (1, 28), name
        else:
            assert (model.config.in_channels, model.config.input_size) == tuple(vae.config.latent_shape[:2]), name
        assert r.sample.get("sampler", "euler") in ("euler", "heun", "ddim", "ancestral"), name
    assert get_recipe("latent").vae == "vae_mnist_f4c4" and get_recipe("latent").guide_at is not None
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        get_recipe("nope")


def test_build_model_opts_in_to_the_cpu_fast_path_only_where_the_recipe_says():
    def fast(model):
        return [("attend" in vars(m)) for m in model.modules() if isinstance(m, AttentionModule)]

    flagship, tiny = get_recipe("flagship"), get_recipe("tiny")
    assert flagship.fast_attention and not tiny.fast_attention
    fast_model = build_model(flagship)
    assert all(fast(fast_model)) and len(fast(fast_model)) == flagship.model.depth
    assert not any(fast(build_model(flagship, device="cuda")))  # the GPU keeps SDPA
    assert not any(fast(build_model(tiny)))
    assert build_model(tiny, get_config("mnist-tiny", depth=3)).config.depth == 3
    # the fast path computes the same function (and an EMA copy keeps it)
    plain = DiT(flagship.model)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.05)
    fast_model.load_state_dict(plain.state_dict())
    x, t, y = torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([1, 2])
    assert torch.allclose(fast_model(x, t, y), plain(x, t, y), atol=1e-5)
    assert all(fast(copy.deepcopy(fast_model)))


def test_latent_recipe_trains_on_latents_and_generates_images():
    r = small_latent_recipe()
    vae = recipe_vae(r)
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    z, secs = training_data(x, vae)
    assert z.shape == (6, *vae.config.latent_shape) and secs >= 0
    torch.testing.assert_close(z, vae.encode_latents(x))
    assert torch.allclose(z, vae.encode(x)[0] * vae.scale, atol=1e-6)  # z = scale · posterior mean
    model, guide = DiT(r.model), DiT(r.model)
    imgs = generate(r, model, torch.arange(4), vae, generator=torch.Generator().manual_seed(0), steps=2,
                    guide=guide)
    assert imgs.shape == (4, 1, 28, 28) and imgs.min() >= -1 and imgs.max() <= 1
    with pytest.raises(ValueError, match="autoguidance .* pass guide="):
        generate(r, model, torch.arange(4), vae, steps=2)
    # guide_scale 1 turns autoguidance off: no guide needed
    assert generate(r, model, torch.arange(2), vae, steps=1, guide_scale=1.0).shape == (2, 1, 28, 28)


def test_generate_decodes_what_the_sampler_returns():
    """A fresh DiT predicts 0: Euler returns the initial noise, so the images are decode(noise / scale); DDIM with
    ε ≡ 0 maps x_T to x0 = x_T / √ᾱ_T exactly (no clipping in latent space)."""
    r = small_latent_recipe()
    vae, model = recipe_vae(r), DiT(r.model)
    noise = torch.randn(3, *vae.config.latent_shape)
    imgs = generate(r, model, torch.arange(3), vae, steps=3, sampler="euler", guide_scale=1.0, noise=noise)
    assert torch.allclose(imgs, vae.decode(noise / vae.scale).clamp(-1, 1), atol=1e-6)
    sched = DDPMSchedule()
    out = generate(r, model, torch.arange(3), vae, steps=1, sampler="ddim", schedule=sched, clip_x0=False,
                   guide_scale=1.0, noise=noise)
    want = vae.decode(noise / sched.alphas_cumprod[-1].sqrt().float() / vae.scale).clamp(-1, 1)
    assert torch.allclose(out, want, atol=1e-4)


def test_generate_is_sample_with_the_recipes_settings_then_clamped():
    r = get_recipe("tiny")
    model = DiT(r.model)
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.normal_(0, 0.5)
    noise = torch.randn(3, 1, 28, 28) * 3
    imgs = generate(r, model, torch.arange(3), noise=noise, steps=2)
    want = sample(model, torch.arange(3), **{**r.sample, "steps": 2}, noise=noise).clamp(-1, 1)
    assert torch.equal(imgs, want) and imgs.abs().max() == 1


def test_train_on_latents_then_sample_and_decode():
    vae = VAE(VAEConfig(factor=4, latent_channels=4, base_channels=8, max_channels=16)).eval()
    x = torch.rand(32, 1, 28, 28) * 2 - 1
    compute_scale(vae, x)
    z, _ = training_data(x, vae)
    assert z.shape == (32, 4, 8, 8) and z.std().item() == pytest.approx(1.0, rel=1e-4)
    r = replace(get_recipe("tiny"), model=get_config("mnist-latent-p2", dim=32, depth=1, num_heads=2),
                vae="vae_mnist_f4c4")
    tr = Trainer(build_model(r), z, torch.arange(32) % 10, TrainConfig(steps=3, batch_size=8, log_every=1))
    tr.run(progress=False)
    assert len(tr.history) == 3
    imgs = generate(r, tr.ema, torch.arange(4), vae, steps=2)
    assert imgs.shape == (4, 1, 28, 28) and imgs.min() >= -1 and imgs.max() <= 1


def test_guide_snapshot_copies_the_ema_once_at_its_fraction():
    r = get_recipe("tiny")
    x, y = torch.rand(64, 1, 28, 28) * 2 - 1, torch.arange(64) % 10
    tr = Trainer(DiT(r.model), x, y, replace(r.train, steps=10, batch_size=8, warmup_steps=0))
    snap = GuideSnapshot(0.3)
    tr.run(progress=False, callback=snap)
    assert snap.step == 3 and snap.model is not tr.ema
    ema_at_3 = snap.model.state_dict()
    assert any(not torch.equal(ema_at_3[k], v) for k, v in tr.ema.state_dict().items())  # a frozen copy
    with pytest.raises(ValueError, match="guide_at must be in"):
        replace(get_recipe("latent"), guide_at=0.0)
    with pytest.raises(ValueError, match="needs guide_at"):
        replace(get_recipe("latent"), guide_at=None)


def test_pixel_recipe_passes_images_through_and_clamps_samples():
    r = get_recipe("tiny")
    x = torch.rand(3, 1, 28, 28)
    z, secs = training_data(x, None)
    assert z is x and secs == 0.0
    imgs = generate(r, DiT(r.model), torch.arange(3), generator=torch.Generator().manual_seed(0), steps=1)
    assert imgs.shape == (3, 1, 28, 28) and imgs.abs().max() <= 1


def test_recipe_space_mismatches_are_named():
    lat, pix = get_recipe("latent"), get_recipe("tiny")
    with pytest.raises(ValueError, match="does not match VAE 'vae_mnist_f4c4'"):
        recipe_vae(replace(lat, model=get_config("mnist-p7")))
    with pytest.raises(ValueError, match="but a VAE was not passed"):
        generate(lat, DiT(lat.model), torch.arange(1), guide_scale=1.0)
    with pytest.raises(ValueError, match="but a VAE was passed"):
        generate(pix, DiT(pix.model), torch.arange(1), recipe_vae(lat))
    wrong = replace(lat, model=get_config("mnist-tiny"))  # a pixel model decoded by the latent recipe's VAE
    with pytest.raises(ValueError, match=r"the VAE's latents are \(B, 4, 8, 8\), got torch.float32 \(1, 1, 28, 28\)"):
        generate(wrong, DiT(wrong.model), torch.arange(1), recipe_vae(lat), steps=1, guide_scale=1.0)


def test_with_train_overrides_ignores_none():
    r = get_recipe("tiny")
    cfg = with_train_overrides(r, steps=7, lr=None, objective="ddpm")
    assert (cfg.steps, cfg.lr, cfg.objective) == (7, r.train.lr, "ddpm") and r.train.steps == 200
    with pytest.raises(ValueError, match="invalid TrainConfig"):
        with_train_overrides(r, lr=-1.0)
