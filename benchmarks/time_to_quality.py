"""Time to quality on a CPU: train a recipe (default: the demo's, `latent`) from scratch under a wall-clock budget,
evaluate at checkpoints.

    python benchmarks/time_to_quality.py --json out/ttq.json            # the recipe's budget, checkpoints every 30 s
    python benchmarks/time_to_quality.py --budget 90 --every 15 --n 1000
    python benchmarks/time_to_quality.py --recipe flagship --json out/ttq_pixel.json   # the lessons' pixel DiT

`seconds` counts the training steps plus, for a latent recipe, encoding the training digits with the shipped
(pre-trained, frozen) VAE; evaluation pauses the clock. At each checkpoint the EMA weights are copied; after
training each copy samples N class-balanced digits with the recipe's CFG sampler (decoded by the VAE for a latent
recipe) and is scored with the package's classifier: conditional accuracy, feature-FID against the 1,000 held-out
digits and the real-vs-real floor at the same N. Rows: {seconds, steps, conditional_accuracy, fid, fid_floor, ...}.
The goal (issue: time to quality): accuracy ≥ 0.95 and fid ≤ 2 × fid_floor within 180 s. The recipe, its model and
its sampler come from `minidit.pipeline`, as `minidit demo` uses them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import asdict, replace

import torch

from minidit.data import mnist_tensors
from minidit.metrics import evaluate
from minidit.pipeline import build_model, generate, get_recipe, recipe_vae, training_data
from minidit.runinfo import command_line, machine, save_result
from minidit.train import Trainer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="latent")
    ap.add_argument("--budget", type=float, default=None, help="training seconds (default: the recipe's)")
    ap.add_argument("--every", type=float, default=30.0, help="evaluate every this many training seconds")
    ap.add_argument("--n", type=int, default=1000, help="samples per evaluation (class-balanced)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--no-ablation", action="store_true",
                    help="skip sampling the final model with CFG alone (what autoguidance adds)")
    args = ap.parse_args(argv)
    if args.every <= 0 or args.n < 10:
        ap.error("--every must be > 0 and --n ≥ 10")
    torch.set_num_threads(args.threads)
    recipe = get_recipe(args.recipe)
    cfg = replace(recipe.train, seed=args.seed)
    if args.budget is not None:
        cfg = replace(cfg, time_budget=args.budget)
    if cfg.time_budget is None:
        ap.error(f"recipe {args.recipe!r} has no time budget: pass --budget")

    torch.manual_seed(args.seed)
    x, y = mnist_tensors("train")
    vae = recipe_vae(recipe)
    x, setup = training_data(x, vae)  # latents (setup = encoding seconds) or the pixels as they are (0 s)
    trainer = Trainer(build_model(recipe), x, y, cfg)  # on the recipe's speed path (as `minidit demo` trains it)
    marks = [min(args.every * (i + 1), cfg.time_budget) for i in range(int(-(-cfg.time_budget // args.every)))]
    # autoguidance: the row at training time m samples with the EMA copied at guide_at·m as its guide
    guide_marks = {m: recipe.guide_at * m for m in marks} if recipe.guide_at else {}
    pending = sorted({*marks, *guide_marks.values()})
    emas: dict[float, tuple[float, int, torch.nn.Module]] = {}  # mark → (seconds, step, EMA copy)

    def checkpoint(t: Trainer) -> None:
        while pending and t.train_seconds >= pending[0] - 1e-9:
            emas[pending.pop(0)] = (setup + t.train_seconds, t.step, copy.deepcopy(t.ema))

    print(f"training {args.recipe!r} for {cfg.time_budget:.0f} s (+ {setup:.1f} s encoding) on "
          f"{torch.get_num_threads()} threads …", file=sys.stderr)
    trainer.run(progress=True, callback=checkpoint)
    for m in pending:  # training stopped before these (only if the budget was reached between steps)
        emas[m] = (setup + trainer.train_seconds, trainer.step, copy.deepcopy(trainer.ema))

    labels = torch.arange(args.n) % 10

    def score(ema: torch.nn.Module, guide: torch.nn.Module | None, **overrides) -> dict:
        t0 = time.perf_counter()
        imgs = generate(recipe, ema, labels, vae, generator=torch.Generator().manual_seed(args.seed), guide=guide,
                        **overrides)
        m = evaluate(imgs, labels)
        return {"conditional_accuracy": round(m["conditional_accuracy"], 4),
                "fid": round(m["fid"], 4), "fid_floor": round(m["fid_floor"], 4), "fid_ratio": round(m["fid_ratio"], 2),
                "precision": round(m["precision"], 3), "recall": round(m["recall"], 3),
                "sample_seconds": round(time.perf_counter() - t0, 1),
                "goal_met": m["conditional_accuracy"] >= 0.95 and m["fid"] <= 2 * m["fid_floor"]}

    rows = []
    for mark in marks:
        seconds, steps, ema = emas[mark]
        guide = emas[guide_marks[mark]] if guide_marks else None
        row = {"seconds": round(seconds, 1), "steps": steps, "guide_step": guide[1] if guide else None,
               **score(ema, guide[2] if guide else None)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    # what autoguidance adds: the final model sampled with CFG alone (the recipe's scale, and the scales around it)
    ablation = []
    if guide_marks and not args.no_ablation:
        final = emas[marks[-1]][2]
        for scale in (recipe.sample.get("cfg_scale", 1.0), 1.5, 2.0):
            ablation.append({"cfg_scale": scale, "guide_scale": 1.0, **score(final, None, cfg_scale=scale,
                                                                             guide_scale=1.0)})
            print(json.dumps(ablation[-1]), flush=True)
    met = [r for r in rows if r["goal_met"]]
    summary = {
        "recipe": args.recipe, "n": args.n, "time_budget": cfg.time_budget,
        "vae": recipe.vae, "vae_encode_seconds": round(setup, 2),
        "first_goal_met_seconds": met[0]["seconds"] if met else None,
        "model_config": recipe.model.to_dict(), "train_config": asdict(cfg), "bf16_autocast": trainer.bf16,
        "sampling": recipe.sample,
        "guide_at": recipe.guide_at,
        "command": command_line("python benchmarks/time_to_quality.py", argv), "machine": machine(),
        "rows": rows,
        "final_without_autoguidance": ablation,
    }
    print(f"goal (acc ≥ 0.95, fid ≤ 2×floor) first met at: {summary['first_goal_met_seconds']} s", file=sys.stderr)
    save_result(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
