"""Named training recipes: a model config, its training settings, how to sample, and (for latent models) the VAE.

`latent` is the recipe the demo runs and benchmarks/time_to_quality.py measures: a DiT on the shipped VAE's
latents, the fastest route to good digits on a CPU that we measured. `flagship` is the pixel-space DiT the lessons
build and train (patch 7 on 28×28 digits).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from minidit.models import DiTConfig, get_config
from minidit.train import TrainConfig


@dataclass(frozen=True)
class Recipe:
    """What to train, how long, how to sample, and in which space (pixels, or a shipped VAE's latents)."""

    model: DiTConfig
    train: TrainConfig
    sample: dict = field(default_factory=dict)  # kwargs for minidit.flow.sample (steps, cfg_scale, sampler, shift,
    # guide_scale)
    description: str = ""
    vae: str | None = None  # a shipped VAE (minidit.vae.load_vae name): train on its latents, decode samples with it
    guide_at: float | None = None  # autoguidance: the EMA copied when training is this fraction done guides sampling

    def __post_init__(self):
        if self.guide_at is not None and not 0 < self.guide_at < 1:
            raise ValueError(f"guide_at must be in (0, 1), got {self.guide_at}")
        if self.sample.get("guide_scale", 1.0) != 1.0 and self.guide_at is None:
            raise ValueError("sample['guide_scale'] needs guide_at (when to copy the guide) to be set")


RECIPES: dict[str, Recipe] = {
    "latent": Recipe(
        model=get_config("mnist-latent-p2"),
        train=TrainConfig(steps=100_000, batch_size=64, lr=2e-3, warmup_steps=50, ema_decay=0.999,
                          lr_schedule="cosine", t_mean=0.5, time_budget=175.0, bf16="auto"),
        sample=dict(steps=10, sampler="heun", cfg_scale=1.15, guide_scale=1.75),
        description="class-conditional DiT on the shipped VAE's MNIST latents (4×8×8, patch 2: 16 tokens), "
                    "175 s on the CPU; CFG 1.15 plus autoguidance by its own EMA at 18 % of training",
        vae="vae_mnist_f4c4",
        guide_at=0.18,
    ),
    "flagship": Recipe(
        model=get_config("mnist-p7"),
        train=TrainConfig(steps=3000, batch_size=64, lr=3e-3, warmup_steps=50, ema_decay=0.999, time_budget=170.0),
        sample=dict(steps=20, cfg_scale=2.5, sampler="euler", shift=3.0),
        description="the lessons' pixel-space DiT on the bundled MNIST digits, patch 7 (16 tokens), 170 s on the CPU",
    ),
    "mnist-s4": Recipe(
        model=get_config("mnist-s4"),
        train=TrainConfig(steps=1500, batch_size=128, lr=2e-3, warmup_steps=50, ema_decay=0.999),
        sample=dict(steps=20, cfg_scale=2.0, sampler="euler"),
        description="a slower, larger patch-4 model (49 tokens): ~13 min on 2 cores",
    ),
    "tiny": Recipe(
        model=get_config("mnist-tiny"),
        train=TrainConfig(steps=200, batch_size=64, lr=2e-3, warmup_steps=20, ema_decay=0.99),
        sample=dict(steps=10, cfg_scale=2.0, sampler="euler"),
        description="a seconds-long smoke run (tests, CI); its samples are not yet digits",
    ),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]


def recipe_vae(recipe: Recipe):
    """The recipe's VAE (checked against the model's input), or None for a pixel-space recipe."""
    if recipe.vae is None:
        return None
    from minidit.vae import load_vae

    vae = load_vae(recipe.vae)
    want = tuple(vae.config.latent_shape[:2])
    got = (recipe.model.in_channels, recipe.model.input_size)
    if got != want:
        raise ValueError(f"recipe model input (C, H) = {got} does not match VAE {recipe.vae!r}'s latent grid {want}")
    return vae


def _check_space(recipe: Recipe, vae) -> None:
    if (vae is None) != (recipe.vae is None):
        raise ValueError(f"recipe vae={recipe.vae!r} but a VAE was {'not ' if vae is None else ''}passed")


def training_data(recipe: Recipe, x: torch.Tensor, vae=None) -> tuple[torch.Tensor, float]:
    """(what the recipe's model trains on, seconds it took): images as they are, or their scaled VAE latents."""
    _check_space(recipe, vae)
    if vae is None:
        return x, 0.0
    t0 = time.perf_counter()
    z = vae.encode_latents(x.to(next(vae.parameters()).device))  # (N, c, S/f, S/f), unit std
    return z, time.perf_counter() - t0


class GuideSnapshot:
    """Trainer callback: copies the EMA weights once training is `fraction` done (autoguidance's weak model)."""

    def __init__(self, fraction: float):
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        self.fraction = fraction
        self.model: torch.nn.Module | None = None
        self.step: int | None = None

    def __call__(self, trainer) -> None:
        c = trainer.cfg
        done = trainer.step / c.steps  # fraction of the run: by steps, or by training time under a budget
        if c.time_budget is not None:
            done = max(done, trainer.train_seconds / c.time_budget)
        if self.model is None and done >= self.fraction:
            self.model, self.step = copy.deepcopy(trainer.ema), trainer.step


@torch.no_grad()
def generate(recipe: Recipe, model: torch.nn.Module, labels: torch.Tensor, vae=None,
             generator: torch.Generator | None = None, guide: torch.nn.Module | None = None,
             **overrides) -> torch.Tensor:
    """Images (N, C, H, W) in [−1, 1] from the recipe's sampler (overrides replace its settings), decoded if latent.

    A recipe with autoguidance (sample['guide_scale'] ≠ 1) needs its `guide`: the EMA copied at `guide_at`.
    """
    from minidit.flow import sample

    kw = {**recipe.sample, **overrides}
    _check_space(recipe, vae)
    if kw.get("guide_scale", 1.0) != 1.0:
        if guide is None:
            raise ValueError(f"this recipe samples with autoguidance (guide_scale {kw['guide_scale']}): pass guide=, "
                             f"the EMA copied at {recipe.guide_at} of training (recipes.GuideSnapshot)")
        kw["guide_model"] = guide
    if vae is None:
        return sample(model, labels, generator=generator, **kw).clamp(-1, 1)
    from minidit.vae import sample_images

    return sample_images(model, vae, labels, generator=generator, **kw)
