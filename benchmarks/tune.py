"""Choose a recipe's settings on the validation digits, never on the test digits the reported figures use.

    python benchmarks/tune.py --recipe latent --steps 4000 --json benchmarks/results/tune_latent.json
    python benchmarks/tune.py --recipe latent --steps 1400 --json /tmp/tune_latent_60s.json   # a 60-s budget's steps

Protocol (minidit.data.split_indices): every candidate trains on the 3,500 "fit" digits and is scored on the 500 "val"
digits (minidit.metrics.evaluate(..., reference="val"): conditional accuracy and feature-FID against the val digits,
beside the floor of 500 real "fit" digits). Training runs for a fixed number of steps — about what the recipe's time
budget gives on an unloaded 2-core CPU — so the choice does not depend on how busy the machine is. For each
(lr, EMA decay) the run snapshots the EMA at each `--guide-at` fraction (autoguidance's weak model) and then samples
every (CFG scale, guide scale, guide fraction) with the recipe's solver. The best row — lowest val FID among rows with
val accuracy ≥ `--min-accuracy` — is printed with the recipe fields to set; the reported figures then come from
`make demo` / benchmarks/time_to_quality.py, which train on all 4,000 "train" digits and score on "test".
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from dataclasses import asdict, replace

import torch

from minidit.data import mnist_tensors
from minidit.metrics import evaluate
from minidit.pipeline import build_model, generate, get_recipe, recipe_vae, training_data
from minidit.runinfo import command_line, machine, save_result
from minidit.train import Trainer


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="latent")
    ap.add_argument("--steps", type=int, required=True, help="training steps of each candidate (no time budget)")
    ap.add_argument("--lr", type=floats, default=None, help="comma-separated (default: the recipe's)")
    ap.add_argument("--ema", type=floats, default=None, help="EMA decays, comma-separated (default: the recipe's)")
    ap.add_argument("--cfg", type=floats, default=[1.0, 1.15, 1.3, 1.5])
    ap.add_argument("--guide-scale", type=floats, default=[1.0, 1.5, 1.75, 2.0])
    ap.add_argument("--guide-at", type=floats, default=[0.18, 0.3])
    ap.add_argument("--min-accuracy", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = get_recipe(args.recipe)
    (x, y), (_, yv) = mnist_tensors("fit"), mnist_tensors("val")
    vae = recipe_vae(recipe)
    x, _ = training_data(x, vae)
    labels = yv.clone()  # one sample per val digit: the same class balance (50 per class)
    rows = []
    for lr, ema in itertools.product(args.lr or [recipe.train.lr], args.ema or [recipe.train.ema_decay]):
        cfg = replace(recipe.train, steps=args.steps, time_budget=None, lr=lr, ema_decay=ema, seed=args.seed)
        torch.manual_seed(args.seed)
        trainer = Trainer(build_model(recipe), x, y, cfg)
        guides: dict[float, torch.nn.Module] = {}

        def snapshot(t: Trainer, guides: dict = guides) -> None:
            for f in args.guide_at:
                if f not in guides and t.step >= f * args.steps:
                    guides[f] = copy.deepcopy(t.ema)

        t0 = time.perf_counter()
        trainer.run(progress=False, callback=snapshot)
        print(f"lr {lr:g}, EMA {ema}: {args.steps} steps in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for cfg_scale, guide_scale, guide_at in itertools.product(args.cfg, args.guide_scale, args.guide_at):
            if guide_scale == 1.0 and guide_at != args.guide_at[0]:
                continue  # without autoguidance the guide does not matter
            images = generate(recipe, trainer.ema, labels, vae, guides[guide_at] if guide_scale != 1.0 else None,
                              torch.Generator().manual_seed(args.seed), cfg_scale=cfg_scale, guide_scale=guide_scale)
            m = evaluate(images, labels, reference="val")
            rows.append({"lr": lr, "ema_decay": ema, "cfg_scale": cfg_scale, "guide_scale": guide_scale,
                         "guide_at": guide_at if guide_scale != 1.0 else None,
                         "val_accuracy": round(m["conditional_accuracy"], 4), "val_fid": round(m["fid"], 4),
                         "val_fid_ratio": round(m["fid_ratio"], 3)})
            print(json.dumps(rows[-1]), flush=True)
    ok = [r for r in rows if r["val_accuracy"] >= args.min_accuracy] or rows
    best = min(ok, key=lambda r: r["val_fid"])
    print(f"best on val: {best}", file=sys.stderr)
    save_result(args.json, {"recipe": args.recipe, "steps": args.steps, "train_config": asdict(recipe.train),
                            "sampling": recipe.sample, "best": best, "rows": rows, "min_accuracy": args.min_accuracy,
                            "command": command_line("python benchmarks/tune.py", argv), "machine": machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
