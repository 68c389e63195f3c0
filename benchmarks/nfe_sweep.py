"""DDPM vs rectified flow on the same DiT with the same training compute, then a sweep over sampling steps (NFE).

Four objectives, identical architecture, steps, batch and seed, on the bundled MNIST digits:
  rf-lognorm  rectified flow, velocity target ε − x0, logit-normal t (SD3's choice)
  rf-uniform  rectified flow, velocity target, uniform t
  ddpm        DDPM ε-prediction (DDPM, DiT), linear betas, 1000 integer steps, uniform k
  ddpm-v      the same DDPM, v-prediction (Salimans & Ho 2022): target √ᾱ·ε − √(1 − ᾱ)·x0
Each objective gets its own learning rate and EMA decay, chosen on the validation split: for every lr of the grid
one run trains on the "fit" digits (3,500) while EMA copies at every decay of the grid are kept beside it (the same
run serves every decay); each EMA model samples N digits with the objective's deterministic sampler (Euler / DDIM) at
NFE `val_nfe`, scored by feature-FID against the 500 "val" digits. Successive halving: every lr is scored after half
the training steps, the best one trains on to the full budget, and its best EMA decay there is chosen.
Then each objective trains
with its chosen settings on all 4,000 training digits and samples N class-balanced digits per (sampler, NFE) from the
same noise, without guidance (cfg_scale = 1, so NFE = network evaluations), scored against the 1,000 held-out
"test" digits (conditional accuracy, feature-FID beside the real-vs-real floor at the same N):
  ddpm-ancestral, ddpm-ddim, ddpm-v-ancestral, ddpm-v-ddim   (NFE = steps; respaced with --spacing, by default
                                      "trailing" (Lin et al. 2024); "linspace" ends on k = 0, DDIM's original choice)
  rf-euler, rf-heun                   (the rf-lognorm model; Heun with k steps costs 2k − 1 NFE: odd NFE ≥ 3)
  rf-uniform-euler                    (the rf-uniform model)
All sampling goes through `minidit.sampling.sample`; the models train on the CPU fast path the recipes use
(`variants.speed.use_fast_attention`).

    python benchmarks/nfe_sweep.py --quick --json out/nfe.json   # 8 runs of 500 steps, N = 100: ≈ 65 CPU-minutes
    python benchmarks/nfe_sweep.py --json out/nfe.json --plot out/nfe.png --save-models DIR     # grid, then sweep
  or in two steps, the grid first (its JSON is what `--validation` reads; the sweep's JSON repeats it):
    python benchmarks/nfe_sweep.py --validate-only --json benchmarks/results/nfe_validation_full.json
    python benchmarks/nfe_sweep.py --validation benchmarks/results/nfe_validation_full.json \\
        --json benchmarks/results/nfe_sweep_full.json --plot benchmarks/results/nfe_sweep_full.png \\
        --save-models benchmarks/results/nfe_full_models
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from minidit.checkpoint import save_model
from minidit.data import mnist_tensors
from minidit.ddpm import DDPMSchedule
from minidit.metrics import evaluate
from minidit.models import DiT, DiTConfig
from minidit.runinfo import command_line, machine, save_result
from minidit.sampling import sample
from minidit.train import TrainConfig, Trainer
from minidit.variants.cost import dit_flops
from minidit.variants.speed import use_fast_attention
from minidit.viz import save_figure

NFES = [1, 2, 5, 10, 50, 250]
# the lessons' pixel DiT (the flagship recipe's model: patch 7, 16 tokens, D = 128, 4 blocks), 2,000 steps × 64 per run.
# EMA decays: the Trainer warms its EMA up with decay min(d, (1 + s)/(10 + s)), which reaches 0.995 only after 1,790
# steps, so in 2,000 steps any d above 0.995 acts like 0.995 (0.999 is never reached): the grid stays below that.
FULL = dict(model=dict(patch_size=7, dim=128, depth=4, num_heads=4), steps=2000, batch_size=64, warmup_steps=50,
            n=500, lrs=[1e-3, 2e-3, 4e-3], ema_decays=[0.98, 0.99, 0.995], val_nfe=25)
# quick: the same model for 500 steps, a one-lr grid, N = 100 — a smoke run of every code path. Its EMA warm-up cap
# at 500 steps is 501/510 ≈ 0.982, below both decays, so the two give the same model (lesson 07 asks why).
QUICK = dict(model=dict(patch_size=7, dim=128, depth=4, num_heads=4), steps=500, batch_size=64, warmup_steps=50,
             n=100, lrs=[3e-3], ema_decays=[0.99, 0.995], val_nfe=10)
OBJECTIVES = {"rf-lognorm": dict(objective="flow", t_sampling="logit_normal"),
              "rf-uniform": dict(objective="flow", t_sampling="uniform"),
              "ddpm": dict(objective="ddpm", ddpm_prediction="eps"),
              "ddpm-v": dict(objective="ddpm", ddpm_prediction="v")}
SCHEDULE = DDPMSchedule("linear")


def is_flow(name: str) -> bool:
    return OBJECTIVES[name]["objective"] == "flow"


def generate(model: DiT, name: str, sampler: str, steps: int, labels: torch.Tensor, noise: torch.Tensor,
             spacing: str = "trailing") -> torch.Tensor:
    """Samples of objective `name`'s model: flow samplers as they are; DDPM ones with the schedule, the respacing,
    the model's prediction type and a fixed generator (the ancestral sampler's fresh noise)."""
    if is_flow(name):
        return sample(model, labels, steps=steps, sampler=sampler, noise=noise)
    return sample(model, labels, steps=steps, sampler=sampler, schedule=SCHEDULE, spacing=spacing, noise=noise,
                  generator=torch.Generator().manual_seed(1), prediction=OBJECTIVES[name]["ddpm_prediction"])


def make_trainer(name: str, settings: dict, lr: float, ema_decay: float, split: str, seed: int) -> Trainer:
    """A Trainer for objective `name` on an MNIST split; identical initial weights for every objective and lr."""
    x, y = mnist_tensors(split)
    torch.manual_seed(seed)
    model = use_fast_attention(DiT(DiTConfig(**settings["model"])))
    cfg = TrainConfig(steps=settings["steps"], batch_size=settings["batch_size"], lr=lr,
                      warmup_steps=settings["warmup_steps"], ema_decay=ema_decay, seed=seed, **OBJECTIVES[name])
    return Trainer(model, x, y, cfg)


class EMAs:
    """EMA copies at several decays, updated after every step exactly as Trainer.update_ema does (with its warm-up),
    so one training run yields the model each decay would have given."""

    def __init__(self, model: torch.nn.Module, decays: list[float]):
        self.models = {d: copy.deepcopy(model).eval().requires_grad_(False) for d in decays}

    @torch.no_grad()
    def __call__(self, tr: Trainer) -> None:
        step = tr.step - 1  # the callback runs after the step counter moved on
        for d, ema in self.models.items():
            decay = min(d, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(tr.model.parameters()), 1 - decay)
            for b_ema, b in zip(ema.buffers(), tr.model.buffers()):
                b_ema.copy_(b)


def row_metrics(images: torch.Tensor, labels: torch.Tensor, reference: str) -> dict:
    m = evaluate(images.clamp(-1, 1), labels, reference=reference)
    return {"conditional_accuracy": round(m["conditional_accuracy"], 4), "fid": round(m["fid"], 4),
            "fid_floor": round(m["fid_floor"], 4), "fid_ratio": round(m["fid_ratio"], 2), "kid": round(m["kid"], 5),
            "precision": round(m["precision"], 3), "recall": round(m["recall"], 3)}


def class_balanced(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(10).repeat_interleave(n // 10 + 1)[:n]
    return labels, torch.randn((n, 1, 28, 28), generator=torch.Generator().manual_seed(seed))


def validate(settings: dict, seed: int, progress: bool) -> dict:
    """The lr × EMA-decay grid on the validation split, by successive halving; returns its rows and the choices.

    Every lr trains for half the budget (the lr is constant after warm-up, so this is the first half of a full run)
    and is scored at every EMA decay; the lr whose best score is lowest then trains on to the full budget, where
    its EMA decays are scored again and the best one is chosen.
    """
    labels, noise = class_balanced(settings["n"], seed + 2)  # not the sweep's noise
    rows, chosen, t0 = [], {}, time.perf_counter()

    def score(name: str, tr: Trainer, emas: EMAs) -> list[dict]:
        mine = emas.models[tr.cfg.ema_decay]  # the Trainer's own EMA: the copies follow the same rule
        assert all(torch.allclose(a, b) for a, b in zip(mine.parameters(), tr.ema.parameters()))
        sampler = "euler" if is_flow(name) else "ddim"
        out = []
        for decay, model in emas.models.items():
            imgs = generate(model, name, sampler, settings["val_nfe"], labels, noise.clone())
            out.append({"objective": name, "lr": tr.cfg.lr, "ema_decay": decay, "sampler": sampler,
                        "nfe": settings["val_nfe"], "steps": tr.step, "final_loss": tr.history[-1]["loss"],
                        "train_seconds": round(tr.train_seconds, 1), **row_metrics(imgs, labels, "val")})
            r = out[-1]
            print(f"validation {name:10s} lr {tr.cfg.lr:g} EMA {decay} step {tr.step}: acc "
                  f"{r['conditional_accuracy']:.3f}  FID {r['fid']:.3f} (floor {r['fid_floor']:.3f})", file=sys.stderr)
        return out

    for name in sorted(OBJECTIVES, key=is_flow):  # the DDPM objectives first
        runs = []
        for lr in settings["lrs"]:
            tr = make_trainer(name, settings, lr, max(settings["ema_decays"]), "fit", seed)
            emas = EMAs(tr.model, settings["ema_decays"])
            tr.run(steps=settings["steps"] // 2, progress=progress, callback=emas)
            rows += score(name, tr, emas)
            runs.append((min(r["fid"] for r in rows[-len(emas.models):]), lr, tr, emas))
        _, lr, tr, emas = min(runs, key=lambda r: r[0])
        runs.clear()  # free the other runs' models
        tr.run(progress=progress, callback=emas)  # on to the full budget
        rows += score(name, tr, emas)
        best = min((r for r in rows if r["objective"] == name and r["steps"] == tr.step), key=lambda r: r["fid"])
        chosen[name] = {"lr": best["lr"], "ema_decay": best["ema_decay"]}
    return {"train_split": "fit", "reference": "val", "n": settings["n"], "steps": settings["steps"],
            "lrs": settings["lrs"], "ema_decays": settings["ema_decays"], "nfe": settings["val_nfe"],
            "criterion": "lowest feature-FID against the validation digits, each model with its deterministic "
                         "sampler (rectified flow: Euler; DDPM: DDIM) at NFE `nfe`, no guidance; every lr scored "
                         "after half the steps, the best one trained on to all of them (successive halving)",
            "rows": rows, "chosen": chosen, "seconds": round(time.perf_counter() - t0, 1)}


def train_all(settings: dict, chosen: dict, seed: int, progress: bool) -> tuple[dict[str, DiT], list[dict]]:
    models, rows = {}, []
    for name in OBJECTIVES:
        tr = make_trainer(name, settings, chosen[name]["lr"], chosen[name]["ema_decay"], "train", seed)
        tr.run(progress=progress)
        models[name] = tr.ema
        rows.append({"objective": name, "steps": tr.step, "batch_size": tr.cfg.batch_size, "lr": tr.cfg.lr,
                     "ema_decay": tr.cfg.ema_decay, "train_seconds": round(tr.train_seconds, 1),
                     "final_loss": tr.history[-1]["loss"],
                     "train_flops": 3 * dit_flops(tr.model.config) * tr.cfg.batch_size * tr.step,
                     "params": tr.model.num_params(), "train_config": asdict(tr.cfg)})
        print(f"trained {name}: {tr.step} steps in {tr.train_seconds:.0f} s", file=sys.stderr)
    return models, rows


def sampler_runs(nfes: list[int]):
    """(method, model, sampler, NFE actually used, solver steps) for every NFE."""
    for nfe in nfes:
        for name in ("ddpm", "ddpm-v"):
            for sampler in ("ancestral", "ddim"):
                yield f"{name}-{sampler}", name, sampler, nfe, nfe
        yield "rf-euler", "rf-lognorm", "euler", nfe, nfe
        k = (nfe + 1) // 2  # Heun with k steps costs 2k − 1 NFE (its last step is plain Euler, minidit.flow)
        if k >= 2:  # one Heun step is one Euler step
            yield "rf-heun", "rf-lognorm", "heun", 2 * k - 1, k
        yield "rf-uniform-euler", "rf-uniform", "euler", nfe, nfe


def plot(rows: list[dict], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        nfe = [r["nfe"] for r in rs]
        style = "s--" if method.startswith("ddpm") else "o-"
        axes[0].plot(nfe, [r["conditional_accuracy"] for r in rs], style, label=method)
        axes[1].plot(nfe, [r["fid"] for r in rs], style, label=method)
    axes[1].axhline(rows[0]["fid_floor"], color="k", ls=":", lw=1, label="real-vs-real floor")
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
    p.add_argument("--quick", action="store_true", help="patch-7 model, 500 steps, N = 100, one-lr grid")
    p.add_argument("--n", type=int, help="samples per (method, NFE) and per validation model (default 500, quick 100)")
    p.add_argument("--steps", type=int, help="training steps per run")
    p.add_argument("--nfe", default=",".join(map(str, NFES)), help="comma-separated NFE values")
    p.add_argument("--spacing", choices=("trailing", "linspace"), default="trailing",
                   help="the DDPM samplers' respaced steps (minidit.ddpm.respaced_steps)")
    p.add_argument("--validation", help="reuse the validation grid (and its choice) recorded in this JSON of an "
                                        "earlier run instead of running it")
    p.add_argument("--validate-only", action="store_true", help="run the validation grid, write it, stop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the table here")
    p.add_argument("--plot", help="write the figure here (PNG)")
    p.add_argument("--save-models", help="folder for the EMA models (fp16 safetensors)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = dict(QUICK if args.quick else FULL)
    settings["n"] = args.n or settings["n"]
    settings["steps"] = args.steps or settings["steps"]
    nfes = [int(s) for s in args.nfe.split(",")]
    t_start = time.perf_counter()
    if args.validation:
        validation = json.loads(Path(args.validation).read_text())["validation"]
        if set(validation["chosen"]) != set(OBJECTIVES):
            raise SystemExit(f"{args.validation} chose settings for {sorted(validation['chosen'])}, "
                             f"not for {sorted(OBJECTIVES)}")
        validation = {**validation, "reused_from": args.validation}
    else:
        validation = validate(settings, args.seed, progress=not args.quick)
    command = command_line("python benchmarks/nfe_sweep.py", argv)
    if args.validate_only:
        save_result(args.json, {"benchmark": "nfe_sweep", "quick": args.quick, "command": command,
                                "model_config": DiTConfig(**settings["model"]).to_dict(), "settings": settings,
                                "validation": validation, "machine": machine()})
        if not args.json:
            print(json.dumps(validation["chosen"]))
        return 0
    models, train_rows = train_all(settings, validation["chosen"], args.seed, progress=not args.quick)
    if args.save_models:
        for name, m in models.items():
            save_model(Path(args.save_models) / f"nfe_{name}.safetensors", m, half=True,
                       train=next(r["train_config"] for r in train_rows if r["objective"] == name), command=command)
    n = settings["n"]
    labels, noise = class_balanced(n, args.seed + 1)
    rows = []
    for method, name, sampler, nfe, steps in sampler_runs(nfes):
        t0 = time.perf_counter()
        imgs = generate(models[name], name, sampler, steps, labels, noise.clone(), args.spacing)
        secs = time.perf_counter() - t0
        rows.append({"method": method, "model": name, "sampler": sampler, "nfe": nfe, "solver_steps": steps, "n": n,
                     "cfg_scale": 1.0, **row_metrics(imgs, labels, "test"), "sample_seconds": round(secs, 2)})
        r = rows[-1]
        print(f"{method:17s} NFE {nfe:3d}: acc {r['conditional_accuracy']:.3f}  FID {r['fid']:.3f} "
              f"(floor {r['fid_floor']:.3f})  {secs:.1f} s", file=sys.stderr)
    out = {
        "benchmark": "nfe_sweep", "quick": args.quick, "command": command,
        "model_config": DiTConfig(**settings["model"]).to_dict(), "settings": settings, "n": n,
        "ddpm_spacing": args.spacing, "validation": validation,
        "note": "same DiT, same steps × batch for every objective, each with the lr and EMA decay it chose on the "
                "validation split; final models trained on the 4,000 training digits; samples without guidance "
                "(cfg 1) from the same noise; feature-FID vs the 1,000 held-out test digits, floor = real training "
                "digits at the same N",
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
