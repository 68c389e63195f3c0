"""Named training recipes: a model config, its training settings and how to sample from it.

`flagship` is the class-conditional MNIST recipe the demo runs; benchmarks/time_to_quality.py measures it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minidit.models import DiTConfig, get_config
from minidit.train import TrainConfig


@dataclass(frozen=True)
class Recipe:
    """What to train, how long, and how to sample for evaluation."""

    model: DiTConfig
    train: TrainConfig
    sample: dict = field(default_factory=dict)  # kwargs for minidit.flow.sample (steps, cfg_scale, sampler, shift)
    description: str = ""


RECIPES: dict[str, Recipe] = {
    "flagship": Recipe(
        model=get_config("mnist-p7"),
        train=TrainConfig(steps=3000, batch_size=64, lr=3e-3, warmup_steps=50, ema_decay=0.999, time_budget=170.0),
        sample=dict(steps=20, cfg_scale=2.5, sampler="euler", shift=3.0),
        description="class-conditional DiT on the bundled MNIST digits, patch 7 (16 tokens), 170 s on the CPU",
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
