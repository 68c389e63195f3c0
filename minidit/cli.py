"""The `minidit` command: train, sample, evaluate, demo, classifier (and grade, see minidit.grading)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from minidit.checkpoint import write_json
from minidit.runinfo import command_line, machine


class CLIError(Exception):
    """A user error: printed as one line, exit status 2, no traceback."""


def _device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def _threads(n: int | None) -> None:
    if n is not None:
        if n < 1:
            raise CLIError(f"--threads must be ≥ 1, got {n}")
        torch.set_num_threads(n)


def _add_train_overrides(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training settings (override the recipe)")
    g.add_argument("--steps", type=int, help="optimizer steps")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--ema-decay", type=float)
    g.add_argument("--objective", choices=["flow", "ddpm"])
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast on / off (default: the recipe's; 'auto' recipes use it where the "
                        "device has bf16 matmul units)")
    g.add_argument("--grad-checkpointing", action="store_true", default=None)
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--seed", type=int)
    g.add_argument("--time-budget", type=float,
                   help="stop after this many seconds of training (0: no budget, train for --steps)")


def _train_config(recipe_train, args) -> object:
    names = ["steps", "batch_size", "lr", "warmup_steps", "ema_decay", "objective", "bf16", "grad_checkpointing",
             "compile", "seed", "time_budget"]
    over = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if over.get("time_budget") == 0:  # --time-budget 0: no budget, train for --steps
        over["time_budget"] = None
    try:
        return replace(recipe_train, **over)
    except ValueError as e:
        raise CLIError(str(e)) from None




# ---- train ---------------------------------------------------------------------------------------------
def _save_guide(path: Path, guide, recipe_name: str, command: str) -> None:
    """An autoguidance guide (a recipes.GuideSnapshot's early EMA) beside the model, for `minidit sample` to find."""
    from minidit.models import save_model
    from minidit.recipes import get_recipe

    recipe = get_recipe(recipe_name)
    save_model(path, guide.model, step=guide.step, recipe=recipe_name, vae=recipe.vae, command=command,
               role=f"autoguidance guide: the EMA at {recipe.guide_at:.0%} of training")


def cmd_train(args) -> int:
    from minidit.data import DataNotAvailableError, dataset_tensors
    from minidit.models import DiT, get_config, save_model
    from minidit.recipes import GuideSnapshot, get_recipe, recipe_vae, training_data
    from minidit.train import Trainer
    from minidit.viz import plot_loss

    _threads(args.threads)
    device = _device(args.device)
    recipe = get_recipe(args.recipe)
    try:
        x, y = dataset_tensors(args.dataset, "train", args.data_root, args.download)
    except DataNotAvailableError as e:
        raise CLIError(str(e)) from None
    try:  # a latent recipe trains on its VAE's latents of these images (the VAE checks it can encode them)
        x, _ = training_data(recipe, x, recipe_vae(recipe))
    except ValueError as e:
        raise CLIError(f"recipe {args.recipe!r} with dataset {args.dataset!r}: {e}") from None
    model_cfg = get_config(args.config) if args.config else recipe.model
    # the data decides channels and size (e.g. CIFAR-10: 3×32×32)
    model_cfg = replace(model_cfg, in_channels=x.shape[1], input_size=x.shape[2], num_classes=int(y.max()) + 1)
    cfg = _train_config(recipe.train, args)
    out = Path(args.out)
    state_path = out / "train_state.safetensors"
    trainer = Trainer(DiT(model_cfg), x, y, cfg, device=device)
    if args.resume:
        if not state_path.exists():
            raise CLIError(f"--resume: no training checkpoint at {state_path}")
        trainer.load(state_path)
        print(f"resumed from step {trainer.step}", file=sys.stderr)
    command = command_line("minidit", args.argv)
    guide_path = out / "guide.safetensors"
    # a recipe with autoguidance samples with the EMA copied at `guide_at` of the run: written as soon as it is taken
    # (a resumed run keeps the one already written)
    guide = GuideSnapshot(recipe.guide_at) if recipe.guide_at and not (args.resume and guide_path.exists()) else None

    def keep_guide(t: Trainer) -> None:
        if guide is not None and guide.model is None:
            guide(t)
            if guide.model is not None and t.rank == 0:
                _save_guide(guide_path, guide, args.recipe, command)

    trainer.run(checkpoint_path=state_path, checkpoint_every=args.checkpoint_every, callback=keep_guide)
    if trainer.rank == 0:
        save_model(out / "model.safetensors", trainer.ema, step=trainer.step, train=asdict(cfg),
                   dataset=args.dataset, recipe=args.recipe, vae=recipe.vae, command=command,
                   train_seconds=round(trainer.train_seconds, 1), machine=machine(device))
        plot_loss(trainer.history, out / "loss.png")
        print(f"trained {trainer.step} steps in {trainer.train_seconds:.1f} s → {out / 'model.safetensors'}")
    return 0


# ---- sample --------------------------------------------------------------------------------------------
def _parse_labels(spec: str, n: int, num_classes: int) -> torch.Tensor:
    if spec == "balanced":
        return torch.arange(n) % num_classes
    try:
        vals = [int(s) for s in spec.split(",")]
    except ValueError:
        raise CLIError(f"--labels must be 'balanced' or comma-separated class ids, got {spec!r}") from None
    if any(v < 0 or v >= num_classes for v in vals):
        raise CLIError(f"--labels must be in [0, {num_classes - 1}], got {vals}")
    return torch.tensor(vals).repeat(-(-n // len(vals)))[:n]


SAMPLE_DEFAULTS = {"steps": 20, "sampler": "euler", "cfg_scale": 2.0, "shift": 1.0, "guide_scale": 1.0}


def _sample_settings(args, meta: dict) -> tuple[dict, str | None]:
    """Sampler settings and guide model: the defaults, then the recipe the checkpoint records, then any flag given.

    A guide scale ≠ 1 (autoguidance) needs a guide model: --guide, else the `guide.safetensors` that `minidit demo`
    writes beside its model. Without one, a scale that came from the recipe falls back to 1 (CFG alone)."""
    from minidit.recipes import RECIPES

    recipe = RECIPES.get(meta.get("recipe"))
    settings = {**SAMPLE_DEFAULTS, **(recipe.sample if recipe is not None else {})}
    settings.update({k: getattr(args, k) for k in SAMPLE_DEFAULTS if getattr(args, k) is not None})
    guide = args.guide
    beside = Path(args.checkpoint).with_name("guide.safetensors")
    if guide is None and settings["guide_scale"] != 1.0 and beside.exists():
        guide = str(beside)
    if guide is None and settings["guide_scale"] != 1.0:
        if args.guide_scale is not None:
            raise CLIError(f"--guide-scale {args.guide_scale} needs --guide (the weaker model to guide with)")
        print(f"recipe {meta.get('recipe')!r} samples with autoguidance, but there is no guide model "
              f"({beside} does not exist, no --guide): sampling with CFG alone", file=sys.stderr)
        settings["guide_scale"] = 1.0
    return settings, guide


def cmd_sample(args) -> int:
    from minidit.checkpoint import CheckpointError, read_meta
    from minidit.data import to_uint8
    from minidit.flow import sample
    from minidit.models import load_model
    from minidit.vae import load_vae, sample_images
    from minidit.viz import save_grid

    _threads(args.threads)
    if args.n < 1:
        raise CLIError(f"--n must be ≥ 1, got {args.n}")
    if not args.out.endswith(".npz"):
        raise CLIError(f"--out must be a .npz file, got {args.out!r}")
    try:
        meta = read_meta(args.checkpoint)
        settings, guide_path = _sample_settings(args, meta)
        model = load_model(args.checkpoint, device=_device(args.device))
        vae_name = meta.get("vae")  # set for models trained on a VAE's latents
        vae = load_vae(vae_name, device=next(model.parameters()).device) if vae_name else None
        guide = load_model(guide_path, device=next(model.parameters()).device) if guide_path else None
    except (CheckpointError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    labels = _parse_labels(args.labels, args.n, model.config.num_classes)
    g = torch.Generator().manual_seed(args.seed)
    print(f"sampling with {settings}" + (f", guide {guide_path}" if guide_path else ""), file=sys.stderr)
    t0 = time.perf_counter()
    kw = dict(settings, generator=g, guide_model=guide)
    try:
        imgs = sample_images(model, vae, labels, **kw) if vae is not None else sample(model, labels, **kw)
    except ValueError as e:
        raise CLIError(str(e)) from None
    secs = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, images=to_uint8(imgs).permute(0, 2, 3, 1).cpu().numpy(),
                        labels=labels.numpy())
    if args.grid:
        save_grid(imgs[: min(100, args.n)], args.grid)
    print(f"wrote {args.n} samples ({secs:.1f} s) → {args.out}  [images uint8 (N, H, W, C), labels int64 (N,)]")
    return 0


# ---- evaluate ------------------------------------------------------------------------------------------
def cmd_evaluate(args) -> int:
    from minidit.data import to_model_range
    from minidit.metrics import evaluate

    try:
        z = np.load(args.samples)
        images, labels = z["images"], z["labels"]
    except (OSError, KeyError, ValueError) as e:
        raise CLIError(f"{args.samples}: need an .npz with arrays 'images' (N, 28, 28, 1) uint8 and 'labels' "
                       f"({e})") from None
    if images.ndim != 4 or images.shape[1:] != (28, 28, 1) or images.dtype != np.uint8:
        raise CLIError(f"'images' must be uint8 (N, 28, 28, 1), got {images.dtype} {images.shape}")
    x = to_model_range(images).permute(0, 3, 1, 2)  # (N, 1, 28, 28)
    m = evaluate(x, torch.as_tensor(labels).long())
    print(json.dumps(m, indent=2))
    if args.json:
        write_json(args.json, m)
    return 0


# ---- demo ----------------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from minidit.data import mnist_tensors
    from minidit.metrics import evaluate
    from minidit.models import DiT, save_model
    from minidit.recipes import GuideSnapshot, generate, get_recipe, recipe_vae, training_data
    from minidit.train import Trainer
    from minidit.viz import plot_loss, save_grid

    _threads(args.threads)
    device = _device(args.device)
    recipe = get_recipe(args.recipe)
    cfg = _train_config(recipe.train, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    x, y = mnist_tensors("train")
    vae = recipe_vae(recipe)
    if vae is not None:
        vae = vae.to(device)
    x, encode_seconds = training_data(recipe, x, vae)
    model = DiT(recipe.model)
    budget = f"≤ {cfg.time_budget:.0f} s" if cfg.time_budget else f"{cfg.steps} steps"
    space = f"latents of VAE {recipe.vae!r} (encoded in {encode_seconds:.1f} s)" if vae is not None else "pixels"
    print(f"minidit demo: recipe {args.recipe!r} ({recipe.description}); {model.num_params():,} parameters, "
          f"{budget} × {cfg.batch_size} images on {device} ({torch.get_num_threads()} threads), {space}",
          file=sys.stderr)
    trainer = Trainer(model, x, y, cfg, device=device)
    guide = GuideSnapshot(recipe.guide_at) if recipe.guide_at else None  # autoguidance's weak model: an early EMA
    trainer.run(callback=guide)
    command = command_line("minidit", args.argv)
    save_model(out / "model.safetensors", trainer.ema, step=trainer.step, train=asdict(cfg), recipe=args.recipe,
               vae=recipe.vae, command=command)
    if guide is not None:
        _save_guide(out / "guide.safetensors", guide, args.recipe, command)
    plot_loss(trainer.history, out / "loss.png", title=f"minidit demo ({args.recipe})")

    n = args.n
    labels = torch.arange(n) % 10
    skw = dict(recipe.sample)
    if args.cfg_scale is not None:
        skw["cfg_scale"] = args.cfg_scale
    print(f"sampling {n} digits ({skw}) …", file=sys.stderr)
    t0 = time.perf_counter()
    imgs = generate(recipe, trainer.ema, labels, vae, generator=torch.Generator().manual_seed(cfg.seed),
                    guide=guide.model if guide is not None else None, **skw)
    sample_seconds = time.perf_counter() - t0
    order = torch.argsort(labels[:100], stable=True)  # grid rows = classes 0…9
    save_grid(imgs[:100][order].cpu(), out / "samples.png", nrow=10)
    metrics = evaluate(imgs.cpu(), labels)
    metrics.update({
        "train_seconds": round(trainer.train_seconds, 2),
        "vae": recipe.vae,
        "vae_encode_seconds": round(encode_seconds, 2),
        "guide_step": guide.step if guide is not None else None,
        "sample_seconds": round(sample_seconds, 2),
        "steps": trainer.step,
        "parameters": model.num_params(),
        "recipe": args.recipe,
        "model_config": recipe.model.to_dict(),
        "train_config": asdict(cfg),
        "bf16_autocast": trainer.bf16,  # what bf16="auto" resolved to on this device
        "sampling": skw,
        "machine": machine(device),
        "command": command,
    })
    write_json(out / "metrics.json", metrics)
    print(f"conditional accuracy {metrics['conditional_accuracy']:.3f} | feature-FID {metrics['fid']:.3f} "
          f"(real-vs-real floor {metrics['fid_floor']:.3f}, ratio {metrics['fid_ratio']:.2f}) | "
          f"train {metrics['train_seconds']:.0f} s, {trainer.step} steps → {out}/")
    return 0


# ---- classifier ----------------------------------------------------------------------------------------
def cmd_classifier(args) -> int:
    from minidit.metrics import save_classifier, train_classifier

    _threads(args.threads)
    model, info = train_classifier(epochs=args.epochs, seed=args.seed)
    info["held_out_accuracy"] = round(info["held_out_accuracy"], 4)
    info["command"] = command_line("minidit", args.argv)  # how to reproduce these weights
    save_classifier(args.out, model, info)
    print(f"held-out accuracy {info['held_out_accuracy']:.4f} → {args.out}")
    return 0


# ---- grade, exercises, autograder (see minidit.grading) ----------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from minidit.data import DATASETS
    from minidit.models import CONFIGS
    from minidit.recipes import RECIPES

    p = argparse.ArgumentParser(prog="minidit", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
        sp.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda if available)")

    t = sub.add_parser("train", help="train a class-conditional DiT (rectified flow or DDPM)")
    t.add_argument("--recipe", default="flagship", choices=sorted(RECIPES))
    t.add_argument("--config", choices=sorted(CONFIGS), help="model config (default: the recipe's)")
    t.add_argument("--dataset", default="mnist-bundled", choices=DATASETS)
    t.add_argument("--data-root", default="data", help="where torchvision datasets live")
    t.add_argument("--download", action="store_true", help="let torchvision download the dataset (online)")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--resume", action="store_true", help="continue from OUT/train_state.safetensors")
    t.add_argument("--checkpoint-every", type=int, default=500)
    _add_train_overrides(t)
    common(t)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="generate class-conditional samples to an .npz (images, labels)")
    s.add_argument("--checkpoint", required=True, help="model.safetensors or train_state.safetensors")
    s.add_argument("--n", type=int, default=100)
    s.add_argument("--out", required=True, help="FILE.npz")
    s.add_argument("--labels", default="balanced", help="'balanced' or e.g. '3' or '1,7'")
    # sampler settings: a flag wins, else the recipe the checkpoint was trained with, else SAMPLE_DEFAULTS
    s.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1: off)")
    s.add_argument("--steps", type=int, help="solver steps")
    s.add_argument("--sampler", choices=["euler", "heun"])
    s.add_argument("--shift", type=float, help="SD3's time shift (1: none)")
    s.add_argument("--guide", help="autoguidance: a weaker model of the same task (default: guide.safetensors "
                                   "beside the checkpoint, which `minidit demo` writes)")
    s.add_argument("--guide-scale", type=float, help="autoguidance scale (1: off)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--grid", help="also write a PNG grid of the first 100")
    common(s)
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("evaluate", help="conditional accuracy and feature-FID of MNIST samples in an .npz")
    e.add_argument("samples", help=".npz from `minidit sample`")
    e.add_argument("--json", help="also write the metrics here")
    e.set_defaults(func=cmd_evaluate)

    d = sub.add_parser("demo", help="train the demo recipe on bundled MNIST, sample with CFG, write metrics")
    d.add_argument("--out", default="out/demo", help="output folder (samples.png, loss.png, metrics.json, model)")
    d.add_argument("--recipe", default="latent", choices=sorted(RECIPES))
    d.add_argument("--n", type=int, default=1000, help="samples to evaluate (100 per class for 1000)")
    d.add_argument("--cfg-scale", type=float, default=None)
    _add_train_overrides(d)
    common(d)
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("classifier", help="train the evaluation classifier on the bundled training digits")
    c.add_argument("--out", default="minidit/weights/mnist_classifier.safetensors")
    c.add_argument("--epochs", type=int, default=30)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=None)
    c.set_defaults(func=cmd_classifier)

    from minidit.grading.cli import add_commands

    add_commands(sub, exercises_name="exercises")  # grade, exercises, autograder

    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # recorded with what a command writes
    try:
        return args.func(args)
    except CLIError as e:
        print(f"minidit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
