"""DDPM vs rectified flow on the same DiT with the same training compute, then a sweep over sampling steps (NFE).

Trains three models with identical architecture, steps, batch, lr and seed on the bundled MNIST digits:
  rf-lognorm  rectified flow, v-prediction, logit-normal t (SD3's choice)
  rf-uniform  rectified flow, v-prediction, uniform t
  ddpm        DDPM ε-prediction, linear betas, 1000 integer steps
then samples N class-balanced digits per (sampler, NFE) from the same initial noise, without guidance
(cfg_scale = 1, so NFE = network evaluations), and reports conditional accuracy and feature-FID beside the
real-vs-real floor at the same N:
  ddpm-ancestral, ddim                     (the ddpm model; NFE = steps; respaced with --spacing, by default
                                           "trailing" (Lin et al. 2024); "linspace" ends on k = 0, the old way)
  rf-euler, rf-heun                        (the rf-lognorm model; Heun with k steps costs 2k − 1 NFE: odd NFE ≥ 3)
  rf-uniform-euler                         (the rf-uniform model)
All sampling goes through `minidit.sampling.sample`; the models train on the CPU fast path the recipes use
(`variants.speed.use_fast_attention`).

    python benchmarks/nfe_sweep.py --quick --json /tmp/nfe.json          # ≈ 4 minutes on 2 cores, N = 100
    python benchmarks/nfe_sweep.py --json benchmarks/results/nfe_sweep_full.json \
        --plot benchmarks/results/nfe_sweep_full.png --save-models DIR  # ≈ 40 minutes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from minidit.checkpoint import save_model
from minidit.cost import dit_flops
from minidit.data import mnist_tensors
from minidit.ddpm import DDPMSchedule
from minidit.metrics import evaluate
from minidit.models import DiT, DiTConfig
from minidit.runinfo import command_line, machine, save_result
from minidit.sampling import sample
from minidit.train import TrainConfig, Trainer
from minidit.variants.speed import use_fast_attention
from minidit.viz import save_figure

NFES = [1, 2, 5, 10, 25, 50, 250]
FULL = dict(model=dict(patch_size=4, dim=128, depth=4, num_heads=4), steps=2000, batch_size=64, lr=2e-3,
            warmup_steps=50, ema_decay=0.999, n=500)
# quick: the flagship's patch-7 model (16 tokens) for 500 steps per objective — ≈ 4 minutes on 2 cores in all
QUICK = dict(model=dict(patch_size=7, dim=128, depth=4, num_heads=4), steps=500, batch_size=64, lr=3e-3,
             warmup_steps=50, ema_decay=0.995, n=100)
OBJECTIVES = {"rf-lognorm": dict(objective="flow", t_sampling="logit_normal"),
              "rf-uniform": dict(objective="flow", t_sampling="uniform"),
              "ddpm": dict(objective="ddpm")}


def train_all(settings: dict, seed: int, progress: bool) -> tuple[dict[str, DiT], list[dict]]:
    x, y = mnist_tensors("train")
    models, rows = {}, []
    for name, obj in OBJECTIVES.items():
        torch.manual_seed(seed)  # identical initial weights for every objective
        model = use_fast_attention(DiT(DiTConfig(**settings["model"])))
        cfg = TrainConfig(steps=settings["steps"], batch_size=settings["batch_size"], lr=settings["lr"],
                          warmup_steps=settings["warmup_steps"], ema_decay=settings["ema_decay"], seed=seed, **obj)
        tr = Trainer(model, x, y, cfg).run(progress=progress)
        models[name] = tr.ema
        rows.append({"objective": name, "steps": tr.step, "batch_size": cfg.batch_size,
                     "train_seconds": round(tr.train_seconds, 1), "final_loss": tr.history[-1]["loss"],
                     "train_flops": 3 * dit_flops(model.config) * cfg.batch_size * tr.step,
                     "params": model.num_params(), "train_config": asdict(cfg)})
        print(f"trained {name}: {tr.step} steps in {tr.train_seconds:.0f} s", file=sys.stderr)
    return models, rows


def sampler_runs(models: dict[str, DiT], nfes: list[int], spacing: str = "trailing"):
    """(method, nfe actually used, solver steps, function that samples from (labels, noise))."""
    sched = DDPMSchedule("linear")
    for nfe in nfes:
        for m in ("ancestral", "ddim"):
            yield (f"ddpm-{m}" if m == "ancestral" else "ddim", nfe, nfe,
                   lambda lab, z, m=m, k=nfe: sample(models["ddpm"], lab, steps=k, sampler=m, schedule=sched,
                                                     spacing=spacing, noise=z,
                                                     generator=torch.Generator().manual_seed(1)))
        yield ("rf-euler", nfe, nfe, lambda lab, z, k=nfe: sample(models["rf-lognorm"], lab, steps=k, noise=z))
        k = (nfe + 1) // 2  # Heun with k steps costs 2k − 1 NFE (its last step is plain Euler, minidit.flow)
        if k >= 2:  # one Heun step is one Euler step
            yield ("rf-heun", 2 * k - 1, k,
                   lambda lab, z, k=k: sample(models["rf-lognorm"], lab, steps=k, sampler="heun", noise=z))
        yield ("rf-uniform-euler", nfe, nfe, lambda lab, z, k=nfe: sample(models["rf-uniform"], lab, steps=k, noise=z))


def plot(rows: list[dict], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        nfe = [r["nfe"] for r in rs]
        axes[0].plot(nfe, [r["conditional_accuracy"] for r in rs], "o-", label=method)
        axes[1].plot(nfe, [r["fid"] for r in rs], "o-", label=method)
    axes[1].axhline(rows[0]["fid_floor"], color="k", ls="--", lw=1, label="real-vs-real floor")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("NFE (network evaluations per sample)")
    axes[0].set_ylabel("conditional accuracy")
    axes[1].set_ylabel("feature-FID")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="patch-7 model, 500 steps, N = 100 (≤ 5 min on 2 cores)")
    p.add_argument("--n", type=int, help="samples per (method, NFE), class-balanced (default 500, quick 100)")
    p.add_argument("--steps", type=int, help="training steps per objective")
    p.add_argument("--nfe", default=",".join(map(str, NFES)), help="comma-separated NFE values")
    p.add_argument("--spacing", choices=("trailing", "linspace"), default="trailing",
                   help="the DDPM samplers' respaced steps (minidit.ddpm.respaced_steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the table here")
    p.add_argument("--plot", help="write the figure here (PNG)")
    p.add_argument("--save-models", help="folder for the three EMA models (fp16 safetensors)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = dict(QUICK if args.quick else FULL)
    settings["n"] = args.n or settings["n"]
    settings["steps"] = args.steps or settings["steps"]
    nfes = [int(s) for s in args.nfe.split(",")]
    t_start = time.perf_counter()
    models, train_rows = train_all(settings, args.seed, progress=not args.quick)
    if args.save_models:
        for name, m in models.items():
            save_model(Path(args.save_models) / f"nfe_{name}.safetensors", m, half=True,
                       train=next(r["train_config"] for r in train_rows if r["objective"] == name),
                       command=command_line("python benchmarks/nfe_sweep.py", argv))
    n = settings["n"]
    labels = torch.arange(10).repeat_interleave(n // 10 + 1)[:n]
    noise = torch.randn((n, 1, 28, 28), generator=torch.Generator().manual_seed(args.seed + 1))
    rows = []
    for method, nfe, steps, fn in sampler_runs(models, nfes, args.spacing):
        t0 = time.perf_counter()
        imgs = fn(labels, noise.clone())
        secs = time.perf_counter() - t0
        m = evaluate(imgs.clamp(-1, 1), labels)
        rows.append({"method": method, "nfe": nfe, "solver_steps": steps, "n": n, "cfg_scale": 1.0,
                     "conditional_accuracy": round(m["conditional_accuracy"], 4), "fid": round(m["fid"], 4),
                     "fid_floor": round(m["fid_floor"], 4), "fid_ratio": round(m["fid_ratio"], 2),
                     "kid": round(m["kid"], 5), "precision": round(m["precision"], 3),
                     "recall": round(m["recall"], 3), "sample_seconds": round(secs, 2)})
        r = rows[-1]
        print(f"{method:17s} NFE {nfe:3d}: acc {r['conditional_accuracy']:.3f}  FID {r['fid']:.3f} "
              f"(floor {r['fid_floor']:.3f})  {secs:.1f} s", file=sys.stderr)
    out = {
        "benchmark": "nfe_sweep", "quick": args.quick,
        "command": command_line("python benchmarks/nfe_sweep.py", argv),
        "model_config": DiTConfig(**settings["model"]).to_dict(), "settings": settings, "n": n,
        "ddpm_spacing": args.spacing,
        "note": "same DiT, same steps × batch for every objective; samples without guidance (cfg 1) from the same "
                "noise; feature-FID vs the 1,000 held-out digits, floor = real training digits at the same N",
        "training": train_rows, "rows": rows,
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "machine": machine(),
    }
    save_result(args.json, out)
    if args.plot:
        plot(rows, args.plot, f"DDPM vs rectified flow, same DiT and training compute (N = {n}, no CFG, DDPM "
                              f"{args.spacing} steps)")
    if not args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
