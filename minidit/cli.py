"""The `minidit` command: demo, train, sample, evaluate, classifier, vae, t2i, notebooks, grade, exercises,
autograder."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from minidit import data, pipeline
from minidit.checkpoint import CheckpointError, load_model, read_meta, save_model, write_json
from minidit.ddpm import DDPMSchedule
from minidit.faithfulness import evaluation_captions, faithfulness_report
from minidit.grading.cli import add_commands as add_grading_commands
from minidit.grading.notebooks import run_notebooks
from minidit.metrics import evaluate, save_classifier
from minidit.models import CONFIGS, get_config
from minidit.runinfo import command_line, machine
from minidit.sampling import SAMPLERS, sample
from minidit.t2i import T2I_CONFIGS, get_t2i_config
from minidit.train import Trainer
from minidit.vae import VAEConfig, evaluate_vae, load_vae, save_vae
from minidit.viz import plot_loss, save_grid


class CLIError(Exception):
    """A user error: printed as one line, exit status 2, no traceback."""


class Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported as one line `minidit CMD: error: …` (exit status 2), like every error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def setup(args) -> torch.device:
    """Threads and device from the common flags."""
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be ≥ 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    name = getattr(args, "device", "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def train_config(recipe, args):
    over = {n: getattr(args, n, None) for n in ("steps", "batch_size", "lr", "warmup_steps", "ema_decay", "objective",
                                                 "bf16", "grad_checkpointing", "compile", "seed", "time_budget")}
    if over["time_budget"] == 0:  # --time-budget 0: no budget, train for --steps
        over["time_budget"], recipe = None, replace(recipe, train=replace(recipe.train, time_budget=None))
    try:
        return pipeline.with_train_overrides(recipe, **over)
    except ValueError as e:
        raise CLIError(str(e)) from None


# ---- commands ------------------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    device = setup(args)
    recipe = pipeline.get_recipe(args.recipe)
    overrides = {} if args.cfg_scale is None else {"cfg_scale": args.cfg_scale}
    print(f"minidit demo: recipe {args.recipe!r} ({recipe.description}) on {device}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    command = command_line("minidit", args.argv)
    m = pipeline.demo(args.recipe, args.out, args.n, train_config(recipe, args), device, command, **overrides)
    print(f"conditional accuracy {m['conditional_accuracy']:.3f} | feature-FID {m['fid']:.3f} (real-vs-real floor "
          f"{m['fid_floor']:.3f}, ratio {m['fid_ratio']:.2f}) | train {m['train_seconds']:.0f} s, {m['steps']} steps "
          f"→ {args.out}/")
    return 0


def cmd_train(args) -> int:
    device = setup(args)
    recipe = pipeline.get_recipe(args.recipe)
    x, y = data.dataset_tensors(args.dataset, "train", args.data_root, args.download)
    x, _ = pipeline.training_data(x, pipeline.recipe_vae(recipe, device))  # a VAE refuses images it cannot encode
    config = get_config(args.config) if args.config else recipe.model  # the data decides channels, size and classes
    config = replace(config, in_channels=x.shape[1], input_size=x.shape[2], num_classes=int(y.max()) + 1)
    cfg, out = train_config(recipe, args), Path(args.out)
    torch.manual_seed(cfg.seed)  # the model's initialisation follows --seed too (as in `minidit demo`)
    state, guide_path = out / "train_state.safetensors", out / "guide.safetensors"
    trainer = Trainer(pipeline.build_model(recipe, config, device), x, y, cfg, device=device)
    if args.resume:
        trainer.load(state)
        print(f"resumed from step {trainer.step}", file=sys.stderr)
    command = command_line("minidit", args.argv)
    # a recipe with autoguidance samples with the EMA copied at `guide_at` of the run: written as soon as it is taken
    # (a resumed run keeps the one already written)
    keep = recipe.guide_at and not (args.resume and guide_path.exists())
    guide = pipeline.GuideSnapshot(recipe.guide_at) if keep else None

    def keep_guide(t: Trainer) -> None:
        if guide is not None and guide.model is None:
            guide(t)
            if guide.model is not None and t.rank == 0:
                save_model(guide_path, guide.model, step=guide.step, recipe=args.recipe, vae=recipe.vae,
                           command=command, role=f"autoguidance guide: the EMA at {recipe.guide_at:.0%} of training")

    trainer.run(checkpoint_path=state, checkpoint_every=args.checkpoint_every, callback=keep_guide)
    if trainer.rank == 0:
        save_model(out / "model.safetensors", trainer.ema, step=trainer.step, train=asdict(cfg), dataset=args.dataset,
                   recipe=args.recipe, vae=recipe.vae, command=command, train_seconds=round(trainer.train_seconds, 1),
                   machine=machine(device))
        plot_loss(trainer.history, out / "loss.png")
        print(f"trained {trainer.step} steps in {trainer.train_seconds:.1f} s → {out / 'model.safetensors'}")
    return 0


def parse_labels(spec: str, n: int, num_classes: int) -> torch.Tensor:
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


def cmd_sample(args) -> int:
    """Sampler settings: the defaults, then the recipe the checkpoint records, then any flag given. A guide scale ≠ 1
    (autoguidance) needs a guide model: --guide, else the `guide.safetensors` written beside the model."""
    device = setup(args)
    if args.n < 1 or not args.out.endswith(".npz"):
        raise CLIError(f"need --n ≥ 1 and an --out ending in .npz, got {args.n}, {args.out!r}")
    meta = read_meta(args.checkpoint)
    recipe = pipeline.RECIPES.get(meta.get("recipe"))
    settings = {**SAMPLE_DEFAULTS, **(recipe.sample if recipe is not None else {})}
    settings.update({k: getattr(args, k) for k in SAMPLE_DEFAULTS if getattr(args, k) is not None})
    guide_path, beside = args.guide, Path(args.checkpoint).with_name("guide.safetensors")
    if guide_path is None and settings["guide_scale"] != 1.0:
        if not beside.exists():
            raise CLIError(f"guide scale {settings['guide_scale']} needs a guide model: pass --guide, or "
                           f"--guide-scale 1 for CFG alone ({beside} does not exist)")
        guide_path = str(beside)
    train = meta.get("train") or {}
    if train.get("objective") == "ddpm":
        settings["schedule"] = DDPMSchedule(train.get("ddpm_schedule", "linear"))
        settings["prediction"] = train.get("ddpm_prediction", "eps")  # a v-model's output is converted to ε / x̂0
        settings["clip_x0"] = meta.get("vae") is None  # latents are not in [−1, 1]
    model = load_model(args.checkpoint, device=device)
    guide = load_model(guide_path, device=device) if guide_path else None
    vae = load_vae(meta["vae"], device) if meta.get("vae") else None
    labels = parse_labels(args.labels, args.n, model.null_label)
    print(f"sampling with {settings}" + (f", guide {guide_path}" if guide_path else ""), file=sys.stderr)
    t0 = time.perf_counter()
    x = sample(model, labels, guide_model=guide, generator=torch.Generator().manual_seed(args.seed), **settings)
    images = (vae.decode_latents(x) if vae is not None else x).clamp(-1, 1).cpu()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, images=data.to_uint8(images).permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
    if args.grid:
        save_grid(images[:100], args.grid)
    print(f"wrote {args.n} samples ({time.perf_counter() - t0:.1f} s) → {args.out}  "
          "[images uint8 (N, H, W, C), labels int64 (N,)]")
    return 0


def cmd_evaluate(args) -> int:
    try:
        z = np.load(args.samples)
        images, labels = z["images"], z["labels"]
    except (OSError, KeyError, ValueError) as e:
        raise CLIError(f"{args.samples}: need an .npz with arrays 'images' (N, 28, 28, 1) uint8 and 'labels' "
                       f"({e})") from None
    if images.ndim != 4 or images.shape[1:] != (28, 28, 1) or images.dtype != np.uint8 \
            or labels.shape != (images.shape[0],):
        raise CLIError(f"'images' must be uint8 (N, 28, 28, 1) and 'labels' (N,), got {images.dtype} {images.shape}, "
                       f"{labels.shape}")
    m = evaluate(data.to_model_range(images).permute(0, 3, 1, 2), torch.as_tensor(labels).long())
    print(json.dumps(m, indent=2))
    if args.json:
        write_json(args.json, m)
    return 0


def cmd_classifier(args) -> int:
    setup(args)
    model, info = pipeline.train_classifier(epochs=args.epochs, seed=args.seed)
    info["held_out_accuracy"] = round(info["held_out_accuracy"], 4)
    save_classifier(args.out, model, {**info, "command": command_line("minidit", args.argv)})
    print(f"held-out accuracy {info['held_out_accuracy']:.4f} → {args.out}")
    return 0


def vae_dataset(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels or None): 'mnist' = the bundled digits (1×28×28); 'shapes' = captioned shapes (3×32×32)."""
    if name == "mnist":
        return data.mnist_tensors(split)
    ds = data.CaptionedShapes(n=4000 if split == "train" else 500, seed=0 if split == "train" else 1)
    return torch.stack([ds[i]["image"] for i in range(len(ds))]), None


def cmd_vae(args) -> int:
    setup(args)
    if args.action == "evaluate":
        vae = load_vae(args.checkpoint)
        m = evaluate_vae(vae, *vae_dataset("mnist" if vae.config.in_channels == 1 else "shapes", "test"))
        print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()))
        return 0
    if not args.out:
        raise CLIError("vae train needs --out FILE.safetensors")
    mnist = args.dataset == "mnist"
    cfg = VAEConfig(in_channels=1 if mnist else 3, image_size=28 if mnist else 32, pad=2 if mnist else 0,
                    factor=args.factor, latent_channels=args.latent_channels, base_channels=args.base_channels,
                    max_channels=args.max_channels, kl_weight=args.kl_weight)
    x = vae_dataset(args.dataset, "train")[0]
    vae, info = pipeline.train_vae(cfg, x, args.steps, args.batch_size, args.lr, args.seed)
    held = evaluate_vae(vae, *vae_dataset(args.dataset, "test"))
    info.update({"dataset": args.dataset, "command": command_line("minidit", args.argv),
                 "held_out": {k: round(v, 4) if isinstance(v, float) else v for k, v in held.items()}})
    save_vae(args.out, vae, info)
    print(f"{vae.num_params():,} parameters, {info['train_seconds']:.0f} s; held-out PSNR {held['psnr']:.2f} dB, "
          f"KL {held['kl_bits']:.0f} bits/image, scale {info['scale']:.4f} → {args.out}")
    return 0


def cmd_t2i(args) -> int:
    device = setup(args)
    t0 = time.perf_counter()
    eval_at = {int(x) for x in args.eval_at.split(",") if x}
    captions = evaluation_captions() if eval_at else {}
    curve: dict[int, dict] = {}

    def evaluate_at(tr: Trainer) -> None:  # runs outside the timed training step
        if tr.step in eval_at:
            curve[tr.step] = {"train_seconds": round(tr.train_seconds, 1),
                              **faithfulness_report(tr.ema, captions, scales=(1.0, 3.0))}
            print(f"step {tr.step}: {curve[tr.step]}", flush=True)

    config = get_t2i_config(args.config)
    trainer = pipeline.train_t2i(config, args.steps, args.batch_size, args.lr, args.n_images, args.seed, args.holdout,
                                 progress=False, device=device, callback=evaluate_at if eval_at else None)
    save_model(args.out, trainer.ema, half=True, train=asdict(trainer.cfg), step=trainer.step,
               train_seconds=trainer.train_seconds, history=trainer.history, num_params=trainer.ema.num_params(),
               command=command_line("minidit", args.argv), config_name=args.config, machine=machine(device),
               wall_seconds=round(time.perf_counter() - t0, 1), curve=curve,
               curve_captions={k: len(v) for k, v in captions.items()})
    print(f"saved {args.out} ({trainer.step} steps, {trainer.train_seconds:.0f} s, final loss "
          f"{trainer.history[-1]['loss']:.4f})")
    return 0


def cmd_notebooks(args) -> int:
    return run_notebooks(args.paths, args.timeout)


# ---- the parser ----------------------------------------------------------------------------------------------
def add_train_overrides(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training settings (override the recipe)")
    for flag, kind, text in [("--steps", int, "optimizer steps"), ("--batch-size", int, None), ("--lr", float, None),
                             ("--warmup-steps", int, None), ("--ema-decay", float, None), ("--seed", int, None),
                             ("--time-budget", float, "stop after this many seconds of training (0: train --steps)")]:
        g.add_argument(flag, type=kind, help=text)
    g.add_argument("--objective", choices=["flow", "ddpm"])
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast on / off (default: the recipe's; 'auto' recipes use it where the device "
                        "has bf16 matmul units)")
    g.add_argument("--grad-checkpointing", action="store_true", default=None)
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="minidit", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, func, help_text: str, threads: bool = True, device: bool = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(func=func)
        if threads:
            sp.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
        if device:
            sp.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda if available)")
        return sp

    d = command("demo", cmd_demo, "train the demo recipe on the bundled MNIST digits, sample, evaluate", device=True)
    d.add_argument("--out", default="out/demo", help="output folder (samples.png, loss.png, metrics.json, model)")
    d.add_argument("--recipe", default="latent", choices=sorted(pipeline.RECIPES))
    d.add_argument("--n", type=int, default=1000, help="samples to evaluate (100 per class for 1000)")
    d.add_argument("--cfg-scale", type=float, default=None)
    add_train_overrides(d)

    t = command("train", cmd_train, "train a class-conditional DiT (rectified flow or DDPM)", device=True)
    t.add_argument("--recipe", default="flagship", choices=sorted(pipeline.RECIPES))
    t.add_argument("--config", choices=sorted(CONFIGS), help="model config (default: the recipe's)")
    t.add_argument("--dataset", default="mnist-bundled", choices=data.DATASETS)
    t.add_argument("--data-root", default="data", help="where torchvision datasets live")
    t.add_argument("--download", action="store_true", help="let torchvision download the dataset (online)")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--resume", action="store_true", help="continue from OUT/train_state.safetensors")
    t.add_argument("--checkpoint-every", type=int, default=500)
    add_train_overrides(t)

    s = command("sample", cmd_sample, "generate class-conditional samples to an .npz (images, labels)", device=True)
    s.add_argument("--checkpoint", required=True, help="model.safetensors or train_state.safetensors")
    s.add_argument("--n", type=int, default=100)
    s.add_argument("--out", required=True, help="FILE.npz")
    s.add_argument("--labels", default="balanced", help="'balanced' or e.g. '3' or '1,7'")
    s.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1: off)")
    s.add_argument("--steps", type=int, help="solver steps")
    s.add_argument("--sampler", choices=SAMPLERS)
    s.add_argument("--shift", type=float, help="SD3's time shift (1: none)")
    s.add_argument("--guide", help="autoguidance: a weaker model of the same task (default: guide.safetensors "
                                   "beside the checkpoint, which `minidit demo` and `minidit train` write)")
    s.add_argument("--guide-scale", type=float, help="autoguidance scale (1: off)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--grid", help="also write a PNG grid of the first 100")

    e = command("evaluate", cmd_evaluate, "conditional accuracy and feature-FID of MNIST samples in an .npz",
                threads=False)
    e.add_argument("samples", help=".npz from `minidit sample`")
    e.add_argument("--json", help="also write the metrics here")

    c = command("classifier", cmd_classifier, "train the evaluation classifier on the bundled training digits")
    c.add_argument("--out", default="minidit/weights/mnist_classifier.safetensors")
    c.add_argument("--epochs", type=int, default=30)
    c.add_argument("--seed", type=int, default=0)

    v = command("vae", cmd_vae, "train a VAE on the bundled digits (or captioned shapes), or evaluate one")
    v.add_argument("action", choices=["train", "evaluate"])
    v.add_argument("checkpoint", nargs="?", help="evaluate: a path or a shipped name, e.g. vae_mnist_f4c4")
    v.add_argument("--out", help="train: FILE.safetensors (fp16 weights + scale; FILE.json beside it)")
    v.add_argument("--dataset", default="mnist", choices=["mnist", "shapes"])
    for flag, kind, default in [("--factor", int, 4), ("--latent-channels", int, 4), ("--base-channels", int, 16),
                                ("--max-channels", int, 64), ("--kl-weight", float, 1e-3), ("--steps", int, 3000),
                                ("--batch-size", int, 64), ("--lr", float, 2e-3), ("--seed", int, 0)]:
        v.add_argument(flag, type=kind, default=default)

    x = command("t2i", cmd_t2i, "train a text-to-image model and save its EMA weights (fp16)", device=True)
    x.add_argument("--config", default="shapes-mmdit", choices=sorted(T2I_CONFIGS))
    x.add_argument("--out", required=True, help="output .safetensors path")
    for flag, kind, default in [("--steps", int, 3000), ("--batch-size", int, 64), ("--lr", float, 1e-3),
                                ("--n-images", int, 6000), ("--holdout", float, 0.1), ("--seed", int, 0)]:
        x.add_argument(flag, type=kind, default=default)
    x.add_argument("--eval-at", default="", help="steps at which to score the EMA's caption faithfulness (e.g. "
                   "500,1000); stored in the checkpoint's JSON as the learning curve")

    n = command("notebooks", cmd_notebooks, "maintainers: execute notebooks top to bottom and save their outputs",
                threads=False)
    n.add_argument("paths", nargs="+", help="notebooks or folders of notebooks")
    n.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")

    add_grading_commands(sub)  # grade, exercises, autograder
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # recorded with what a command writes
    try:
        return args.func(args)
    except (CLIError, CheckpointError, data.DataNotAvailableError, ValueError, OSError) as e:  # bad input or files
        print(f"minidit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
