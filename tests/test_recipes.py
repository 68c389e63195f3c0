from dataclasses import replace

import pytest
import torch

from minidit.models import DiT, get_config
from minidit.recipes import RECIPES, GuideSnapshot, generate, get_recipe, recipe_vae, training_data
from minidit.train import Trainer


def test_every_recipe_builds_and_matches_its_space():
    for name, r in RECIPES.items():
        model = DiT(r.model)
        vae = recipe_vae(r)
        if r.vae is None:
            assert vae is None and (r.model.in_channels, r.model.input_size) == (1, 28), name
        else:
            assert (model.config.in_channels, model.config.input_size) == tuple(vae.config.latent_shape[:2]), name
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        get_recipe("nope")


def test_latent_recipe_trains_on_latents_and_generates_images():
    r = get_recipe("latent")
    vae = recipe_vae(r)
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    z, secs = training_data(r, x, vae)
    assert z.shape == (6, *vae.config.latent_shape) and secs >= 0
    torch.testing.assert_close(z, vae.encode_latents(x))
    tiny = replace(r, model=replace(r.model, dim=32, depth=1, num_heads=2))
    model, guide = DiT(tiny.model), DiT(tiny.model)
    imgs = generate(tiny, model, torch.arange(4), vae, generator=torch.Generator().manual_seed(0), steps=2,
                    guide=guide)
    assert imgs.shape == (4, 1, 28, 28) and imgs.min() >= -1 and imgs.max() <= 1
    with pytest.raises(ValueError, match="autoguidance .* pass guide="):
        generate(tiny, model, torch.arange(4), vae, steps=2)
    # guide_scale 1 turns autoguidance off: no guide needed
    assert generate(tiny, model, torch.arange(2), vae, steps=1, guide_scale=1.0).shape == (2, 1, 28, 28)


def test_guide_snapshot_copies_the_ema_once_at_its_fraction():
    r = get_recipe("tiny")
    x, y = torch.rand(64, 1, 28, 28) * 2 - 1, torch.arange(64) % 10
    tr = Trainer(DiT(r.model), x, y, replace(r.train, steps=10, batch_size=8, warmup_steps=0))
    snap = GuideSnapshot(0.3)
    tr.run(progress=False, callback=snap)
    assert snap.step == 3 and snap.model is not tr.ema
    ema_at_3 = snap.model.state_dict()
    assert any(not torch.equal(ema_at_3[k], v) for k, v in tr.ema.state_dict().items())  # a frozen copy
    with pytest.raises(ValueError, match="fraction must be in"):
        GuideSnapshot(1.0)
    with pytest.raises(ValueError, match="guide_at must be in"):
        replace(get_recipe("latent"), guide_at=0.0)
    with pytest.raises(ValueError, match="needs guide_at"):
        replace(get_recipe("latent"), guide_at=None)


def test_pixel_recipe_passes_images_through_and_clamps_samples():
    r = get_recipe("tiny")
    x = torch.rand(3, 1, 28, 28)
    z, secs = training_data(r, x)
    assert z is x and secs == 0.0
    imgs = generate(r, DiT(r.model), torch.arange(3), generator=torch.Generator().manual_seed(0), steps=1)
    assert imgs.shape == (3, 1, 28, 28) and imgs.abs().max() <= 1


def test_recipe_space_mismatches_are_named():
    lat, pix = get_recipe("latent"), get_recipe("tiny")
    with pytest.raises(ValueError, match="does not match VAE 'vae_mnist_f4c4'"):
        recipe_vae(replace(lat, model=get_config("mnist-p7")))
    with pytest.raises(ValueError, match="but a VAE was not passed"):
        training_data(lat, torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match="but a VAE was passed"):
        generate(pix, DiT(pix.model), torch.arange(1), recipe_vae(lat))
