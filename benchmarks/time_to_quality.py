"""Time to quality on a CPU: train the flagship recipe from scratch under a wall-clock budget, evaluate at checkpoints.

    python benchmarks/time_to_quality.py --json out/ttq.json            # 180 s budget, checkpoints every 30 s
    python benchmarks/time_to_quality.py --budget 90 --every 15 --n 1000

Only training steps count toward `seconds` (evaluation pauses the clock). At each checkpoint the EMA weights
are copied; after training each copy samples N class-balanced digits with the recipe's CFG sampler and is
scored with the package's classifier: conditional accuracy, feature-FID against the 1,000 held-out digits and
the real-vs-real floor at the same N. Rows: {seconds, steps, conditional_accuracy, fid, fid_floor, ...}.
The goal (issue: time to quality): accuracy ≥ 0.95 and fid ≤ 2 × fid_floor within 180 s.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace

import torch

from minidit.checkpoint import write_json
from minidit.data import mnist_tensors
from minidit.flow import sample
from minidit.metrics import evaluate
from minidit.models import DiT
from minidit.recipes import get_recipe
from minidit.train import Trainer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="flagship")
    ap.add_argument("--budget", type=float, default=None, help="training seconds (default: the recipe's)")
    ap.add_argument("--every", type=float, default=30.0, help="evaluate every this many training seconds")
    ap.add_argument("--n", type=int, default=1000, help="samples per evaluation (class-balanced)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", help="write the rows here")
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
    trainer = Trainer(DiT(recipe.model), x, y, cfg)
    marks = [min(args.every * (i + 1), cfg.time_budget) for i in range(int(-(-cfg.time_budget // args.every)))]
    snapshots: list[tuple[float, int, torch.nn.Module]] = []

    def checkpoint(t: Trainer) -> None:
        while marks and t.train_seconds >= marks[0] - 1e-9:
            marks.pop(0)
            snapshots.append((t.train_seconds, t.step, copy.deepcopy(t.ema)))

    print(f"training {args.recipe!r} for {cfg.time_budget:.0f} s on {torch.get_num_threads()} threads …",
          file=sys.stderr)
    trainer.run(progress=True, callback=checkpoint)
    if not snapshots or snapshots[-1][1] != trainer.step:
        snapshots.append((trainer.train_seconds, trainer.step, copy.deepcopy(trainer.ema)))

    labels = torch.arange(args.n) % 10
    rows = []
    for seconds, steps, ema in snapshots:
        t0 = time.perf_counter()
        imgs = sample(ema, labels, generator=torch.Generator().manual_seed(args.seed), **recipe.sample)
        m = evaluate(imgs, labels)
        row = {"seconds": round(seconds, 1), "steps": steps,
               "conditional_accuracy": round(m["conditional_accuracy"], 4),
               "fid": round(m["fid"], 4), "fid_floor": round(m["fid_floor"], 4), "fid_ratio": round(m["fid_ratio"], 2),
               "precision": round(m["precision"], 3), "recall": round(m["recall"], 3),
               "sample_seconds": round(time.perf_counter() - t0, 1),
               "goal_met": m["conditional_accuracy"] >= 0.95 and m["fid"] <= 2 * m["fid_floor"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    met = [r for r in rows if r["goal_met"]]
    summary = {
        "recipe": args.recipe, "n": args.n, "time_budget": cfg.time_budget,
        "first_goal_met_seconds": met[0]["seconds"] if met else None,
        "model_config": recipe.model.to_dict(), "train_config": asdict(cfg), "sampling": recipe.sample,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    print(f"goal (acc ≥ 0.95, fid ≤ 2×floor) first met at: {summary['first_goal_met_seconds']} s", file=sys.stderr)
    if args.json:
        write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
