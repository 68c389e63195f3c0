"""The pipeline: recipe → train → sample → decode → evaluate. `minidit demo`, the benchmarks and the notebooks use it.

A recipe names a model config, its training settings, how to sample (steps, solver, guidance) and in which space it
lives (pixels, or the latents of a shipped VAE). `latent` is the demo's recipe: the fastest route to good digits on a
CPU that we measured. `flagship` is the pixel-space DiT the lessons build and train (patch 7 on 28×28 digits).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from minidit.checkpoint import save_model, write_json
from minidit.data import mnist_tensors
from minidit.metrics import MnistClassifier, accuracy, evaluate
from minidit.models import DiT, DiTConfig, get_config
from minidit.runinfo import machine
from minidit.sampling import sample
from minidit.t2i import T2IConfig, TextToImage, heldout_captions, shapes_tensors
from minidit.train import TrainConfig, Trainer
from minidit.vae import VAE, VAEConfig, compute_scale, load_vae
from minidit.variants.speed import use_fast_attention
from minidit.viz import plot_loss, save_grid


@dataclass(frozen=True)
class Recipe:
    """What to train, how long, how to sample, and in which space (pixels, or a shipped VAE's latents)."""

    model: DiTConfig
    train: TrainConfig
    sample: dict = field(default_factory=dict)  # keyword arguments of minidit.sampling.sample
    description: str = ""
    vae: str | None = None  # a shipped VAE (minidit.vae.load_vae name): train on its latents, decode samples with it
    guide_at: float | None = None  # autoguidance: the EMA copied when training is this fraction done guides sampling
    fast_attention: bool = False  # train with the CPU speed path for short sequences (minidit.variants.speed)

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
        vae="vae_mnist_f4c4", guide_at=0.18, fast_attention=True,
    ),
    "flagship": Recipe(
        model=get_config("mnist-p7"),
        train=TrainConfig(steps=3000, batch_size=64, lr=3e-3, warmup_steps=50, ema_decay=0.999, time_budget=170.0),
        sample=dict(steps=20, cfg_scale=2.5, sampler="euler", shift=3.0),
        description="the lessons' pixel-space DiT on the bundled MNIST digits, patch 7 (16 tokens), 170 s on the CPU",
        fast_attention=True,
    ),
    "lesson04": Recipe(
        model=get_config("mnist-p7"),
        train=TrainConfig(steps=2000, batch_size=64, lr=3e-3, warmup_steps=50, ema_decay=0.999, lr_schedule="cosine",
                          time_budget=100.0, bf16="auto"),
        sample=dict(steps=20, sampler="euler", cfg_scale=2.0, shift=3.0),
        description="lesson 04's in-notebook pixel DiT (patch 7): 2,000 steps or 100 s; settings chosen on val",
        fast_attention=True,
    ),
    "mnist-s4": Recipe(
        model=get_config("mnist-s4"),
        train=TrainConfig(steps=1500, batch_size=128, lr=2e-3, warmup_steps=50, ema_decay=0.999),
        sample=dict(steps=20, cfg_scale=2.0, sampler="euler"),
        description="a slower, larger patch-4 model (49 tokens): ~13 min on 2 cores", fast_attention=True,
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


def recipe_vae(recipe: Recipe, device: torch.device | str = "cpu") -> VAE | None:
    """The recipe's VAE (checked against the model's input), or None for a pixel-space recipe."""
    if recipe.vae is None:
        return None
    vae = load_vae(recipe.vae, device)
    if (recipe.model.in_channels, recipe.model.input_size) != vae.config.latent_shape[:2]:
        raise ValueError(f"recipe model input (C, H) = ({recipe.model.in_channels}, {recipe.model.input_size}) does "
                         f"not match VAE {recipe.vae!r}'s latent grid {vae.config.latent_shape}")
    return vae


def training_data(x: torch.Tensor, vae: VAE | None) -> tuple[torch.Tensor, float]:
    """(what the model trains on, seconds it took): images as they are, or their scaled VAE latents."""
    if vae is None:
        return x, 0.0
    t0 = time.perf_counter()
    z = vae.encode_latents(x.to(vae.scale.device))  # (N, c, S/f, S/f), unit std
    return z, time.perf_counter() - t0


def build_model(recipe: Recipe, config: DiTConfig | None = None, device: torch.device | str = "cpu") -> DiT:
    """The recipe's DiT (or one of `config`), on the CPU speed path where the recipe opts in to it."""
    model = DiT(config or recipe.model)
    return use_fast_attention(model) if recipe.fast_attention and torch.device(device).type == "cpu" else model


class GuideSnapshot:
    """Trainer callback: copies the EMA weights once training is `fraction` done (autoguidance's weak model)."""

    def __init__(self, fraction: float):
        self.fraction, self.model, self.step = fraction, None, None

    def __call__(self, trainer: Trainer) -> None:
        done = trainer.step / trainer.cfg.steps  # fraction of the run: by steps, or by training time under a budget
        if trainer.cfg.time_budget is not None:
            done = max(done, trainer.train_seconds / trainer.cfg.time_budget)
        if self.model is None and done >= self.fraction:
            self.model, self.step = copy.deepcopy(trainer.ema), trainer.step


@torch.no_grad()
def generate(recipe: Recipe, model: torch.nn.Module, labels: torch.Tensor, vae: VAE | None = None,
             guide: torch.nn.Module | None = None, generator: torch.Generator | None = None,
             **overrides) -> torch.Tensor:
    """Images (N, C, H, W) in [−1, 1] from the recipe's sampler (overrides replace its settings), decoded if latent.

    A recipe with autoguidance (sample['guide_scale'] ≠ 1) needs its `guide`: the EMA copied at `guide_at`.
    """
    kw = {**recipe.sample, **overrides}
    if kw.get("guide_scale", 1.0) != 1.0 and guide is None:
        raise ValueError(f"this recipe samples with autoguidance (guide_scale {kw['guide_scale']}): pass guide=, "
                         f"the EMA copied at {recipe.guide_at} of training (pipeline.GuideSnapshot)")
    if (vae is None) != (recipe.vae is None):
        raise ValueError(f"recipe vae={recipe.vae!r} but a VAE was {'not ' if vae is None else ''}passed")
    x = sample(model, labels, guide_model=guide, generator=generator, **kw)
    return (vae.decode_latents(x) if vae is not None else x).clamp(-1, 1)


def demo(recipe_name: str = "latent", out: str | Path = "out/demo", n: int = 1000,
         train: TrainConfig | None = None, device: torch.device | str = "cpu", command: str = "",
         **sample_overrides) -> dict:
    """Train a recipe on the bundled training digits, sample n class-balanced digits, evaluate them against the
    held-out digits; writes model/guide weights, samples.png, loss.png and metrics.json to `out`. Returns the metrics.
    """
    recipe = get_recipe(recipe_name)
    cfg = train or recipe.train
    out = Path(out)
    torch.manual_seed(cfg.seed)
    vae = recipe_vae(recipe, device)
    x, y = mnist_tensors("train")
    x, encode_seconds = training_data(x, vae)
    trainer = Trainer(build_model(recipe, device=device), x, y, cfg, device=device)
    guide = GuideSnapshot(recipe.guide_at) if recipe.guide_at else None
    trainer.run(callback=guide)
    save_model(out / "model.safetensors", trainer.ema, step=trainer.step, train=asdict(cfg), recipe=recipe_name,
               vae=recipe.vae, command=command)
    if guide is not None:
        save_model(out / "guide.safetensors", guide.model, step=guide.step, recipe=recipe_name, vae=recipe.vae,
                   command=command, role=f"autoguidance guide: the EMA at {recipe.guide_at:.0%} of training")
    plot_loss(trainer.history, out / "loss.png", title=f"minidit demo ({recipe_name})")
    labels = torch.arange(n) % 10
    t0 = time.perf_counter()
    images = generate(recipe, trainer.ema, labels, vae, guide.model if guide else None,
                      torch.Generator().manual_seed(cfg.seed), **sample_overrides)
    sample_seconds = time.perf_counter() - t0
    save_grid(images[:100][torch.argsort(labels[:100], stable=True)].cpu(), out / "samples.png", nrow=10)
    metrics = {**evaluate(images.cpu(), labels), "train_seconds": round(trainer.train_seconds, 2),
               "vae_encode_seconds": round(encode_seconds, 2), "sample_seconds": round(sample_seconds, 2),
               "steps": trainer.step, "guide_step": guide.step if guide else None,
               "parameters": trainer.ema.num_params(),
               "recipe": recipe_name, "vae": recipe.vae, "model_config": recipe.model.to_dict(),
               "train_config": asdict(cfg), "bf16_autocast": trainer.bf16,
               "sampling": {**recipe.sample, **sample_overrides}, "machine": machine(device), "command": command}
    write_json(out / "metrics.json", metrics)
    return metrics


# ---- the other models' training: the same Trainer, other objectives -------------------------------------------
def train_vae(config: VAEConfig, images: torch.Tensor, steps: int = 3000, batch_size: int = 64, lr: float = 2e-3,
              seed: int = 0, progress: bool = True) -> tuple[VAE, dict]:
    """Train a VAE (warm-up over 5 % of the steps, cosine decay to 5 % of lr), then set its latent scale."""
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 20), lr_schedule="cosine",
                      lr_min_ratio=0.05, ema_decay=0.0, objective="vae", seed=seed)
    torch.manual_seed(seed)
    trainer = Trainer(VAE(config), images, None, cfg).run(progress=progress)
    vae = trainer.model.eval()
    scale = compute_scale(vae, images)
    with torch.no_grad():
        logvar = torch.cat([vae.encode(images[i : i + 500])[1] for i in range(0, images.shape[0], 500)])
    last = trainer.history[-1]
    return vae, {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "train_images": int(images.shape[0]),
                 "train_seconds": round(trainer.train_seconds, 1), "scale": scale, "final_loss": last["loss"],
                 "posterior_std": float(logvar.mul(0.5).exp().mean()) * scale}  # in scaled-latent units


def train_classifier(epochs: int = 30, batch_size: int = 128, lr: float = 3e-3, seed: int = 0,
                     progress: bool = True) -> tuple[MnistClassifier, dict]:
    """Train the evaluation classifier on the bundled training digits (random affine augmentation, label smoothing)."""
    x, y = mnist_tensors("train")
    steps = epochs * (x.shape[0] // batch_size)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, weight_decay=1e-4, warmup_steps=steps // 4,
                      lr_schedule="cosine", lr_min_ratio=0.0, ema_decay=0.0, grad_clip=None, objective="classifier",
                      seed=seed)
    torch.manual_seed(seed)
    trainer = Trainer(MnistClassifier(), x, y, cfg).run(progress=progress)
    model = trainer.model.eval()
    return model, {"held_out_accuracy": accuracy(model, *mnist_tensors("test")), "epochs": epochs,
                   "train_seconds": round(trainer.train_seconds, 1), "batch_size": batch_size, "lr": lr, "seed": seed,
                   "train_images": int(x.shape[0])}


def train_t2i(config: T2IConfig, steps: int = 3000, batch_size: int = 64, lr: float = 1e-3, n_images: int = 6000,
              seed: int = 0, holdout: float = 0.1, progress: bool = True, time_budget: float | None = None,
              device: torch.device | str = "cpu", callback=None) -> Trainer:
    """Train a text-to-image model on captioned shapes (or MNIST captions); returns the Trainer (sample its `.ema`).

    Captions in `heldout_captions(holdout)` are never trained on, so faithfulness can be measured on seen and
    unseen combinations. `callback(trainer)` runs after every step.
    """
    torch.manual_seed(seed)
    if config.caption_set == "shapes":
        exclude = heldout_captions(holdout) if holdout else None
        images, y, _ = shapes_tensors(n_images, seed=seed, exclude=exclude, size=config.input_size)
    else:
        images, y = mnist_tensors("train")  # label i ↔ caption i ("a handwritten <i>")
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(100, steps // 10), ema_decay=0.999,
                      seed=seed, time_budget=time_budget, extra={"n_images": int(images.shape[0]), "holdout": holdout})
    return Trainer(TextToImage(config), images, y, cfg, device=device).run(progress=progress, callback=callback)


def with_train_overrides(recipe: Recipe, **overrides) -> TrainConfig:
    """The recipe's training settings with some replaced (None values are ignored)."""
    return replace(recipe.train, **{k: v for k, v in overrides.items() if v is not None})
