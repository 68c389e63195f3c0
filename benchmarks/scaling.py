"""Does compute, not parameter count, predict quality? DiT's scaling study (Figures 6, 8, 9) at MNIST scale.

A grid of DiTs (adaLN-Zero, `minidit.models.DiT`) over width × depth × patch size, every one trained the same way:
same steps, batch, learning rate, EMA, data order and seeds. Changing the patch size changes the tokens — and so the
FLOPs — at (almost) constant parameters; changing width or depth changes both. Each model's EMA is scored at
checkpoints along training (conditional accuracy and feature-FID of N class-balanced unguided samples, 20 Euler
steps, beside the real-vs-real floor at the same N), so FID can be read against
  - forward FLOPs per image (DiT's "Gflops", Figure 8), at the end of training;
  - parameters, at the end of training;
  - training compute = 3 × forward FLOPs × batch × steps (DiT's estimate, Figure 9), at every checkpoint.
Settings: one learning rate for every size, as DiT trained every size with one lr — 2e-3, the one
conditioning_ablation.py uses for every variant of the flagship model (this grid's w128-L4/7); no sampling shift.
Trained on "train", scored against the 1,000 held-out "test" digits.

The cost model is checked against the clock: one training step of every config is timed side by side in alternating
rounds (`minidit.variants.speed.time_alternating`) and compared with FLOPs ÷ one achieved FLOP/s (one fitted
constant), and with FLOPs ÷ rate + a fixed per-step overhead (two fitted constants).

    python benchmarks/scaling.py --json benchmarks/results/scaling.json
    python benchmarks/scaling.py --quick --json /tmp/scaling.json        # smoke run: 3 configs, a few steps

Models train on the CPU fast path (`variants.speed.use_fast_attention`), in fp32.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

from minidit.data import mnist_tensors
from minidit.metrics import evaluate
from minidit.models import DiT, DiTConfig
from minidit.runinfo import command_line, machine, save_result
from minidit.sampling import sample
from minidit.train import TrainConfig, Trainer
from minidit.variants.cost import dit_flops
from minidit.variants.speed import time_alternating, use_fast_attention

# (width, depth, patch): two widths × two depths × patches 7, 4 (16, 49 tokens), plus patch 2 (196 tokens) for the
# smallest model. Same FLOPs, 4× the parameters: w64-L4/4 and w128-L4/7; w64-L2/2 has the fewest parameters of the
# grid and more FLOPs than all but one model.
GRID = [(64, 2, 7), (64, 2, 4), (64, 2, 2), (64, 4, 7), (64, 4, 4),
        (128, 2, 7), (128, 2, 4), (128, 4, 7), (128, 4, 4)]
LR, SHIFT = 2e-3, 1.0  # one lr for every size (DiT did the same), conditioning_ablation.py's; no sampling shift
FULL = dict(grid=GRID, steps=1600, batch_size=64, lr=LR, warmup_steps=100, ema_decay=0.999, n=1000, seeds=[0, 1],
            eval_steps=[200, 400, 800, 1600], timing_rounds=3, timing_calls=3)
QUICK = dict(FULL, grid=[(64, 2, 7), (64, 2, 4), (128, 2, 7)], steps=20, batch_size=32, n=100, seeds=[0],
             eval_steps=[10, 20], timing_rounds=1, timing_calls=1)  # smoke only: not a result
SAMPLE = dict(steps=20, sampler="euler", cfg_scale=1.0, shift=SHIFT)


def config_of(width: int, depth: int, patch: int) -> DiTConfig:
    return DiTConfig(patch_size=patch, dim=width, depth=depth, num_heads=width // 32)


def name_of(width: int, depth: int, patch: int) -> str:
    return f"w{width}-L{depth}/{patch}"


def train_config(settings: dict, seed: int) -> TrainConfig:
    return TrainConfig(steps=settings["steps"], batch_size=settings["batch_size"], lr=settings["lr"],
                       warmup_steps=settings["warmup_steps"], ema_decay=settings["ema_decay"], seed=seed)


def scores(model, n: int, seed: int) -> dict:
    labels = torch.arange(10).repeat_interleave(n // 10 + 1)[:n]
    imgs = sample(model, labels, generator=torch.Generator().manual_seed(1000 + seed), **SAMPLE)
    m = evaluate(imgs.clamp(-1, 1), labels)
    return {"conditional_accuracy": round(m["conditional_accuracy"], 4), "fid": round(m["fid"], 4),
            "fid_floor": round(m["fid_floor"], 4), "fid_ratio": round(m["fid_ratio"], 2),
            "precision": round(m["precision"], 3), "recall": round(m["recall"], 3)}


def run_one(spec: tuple[int, int, int], seed: int, settings: dict, images, labels, progress: bool) -> list[dict]:
    """Train one config; score its EMA at every eval step. One row per checkpoint."""
    config = config_of(*spec)
    torch.manual_seed(seed)
    model = use_fast_attention(DiT(config))
    flops, params = dit_flops(config), model.num_params()
    rows = []

    def at_checkpoint(tr: Trainer) -> None:
        if tr.step in settings["eval_steps"]:
            rows.append({"config": name_of(*spec), "width": spec[0], "depth": spec[1], "patch": spec[2],
                         "tokens": config.num_tokens, "params": params, "flops": flops, "seed": seed,
                         "step": tr.step, "train_flops": 3 * flops * settings["batch_size"] * tr.step,
                         "train_seconds": round(tr.train_seconds, 1), **scores(tr.ema, settings["n"], seed)})

    Trainer(model, images, labels, train_config(settings, seed)).run(progress=progress, callback=at_checkpoint)
    return rows


def time_steps(settings: dict, images, labels) -> list[dict]:
    """One training step of every config, timed side by side in alternating rounds, against the FLOP model."""
    trainers = {}
    for spec in settings["grid"]:
        torch.manual_seed(0)
        trainers[name_of(*spec)] = Trainer(use_fast_attention(DiT(config_of(*spec))), images, labels,
                                           train_config(dict(settings, steps=10**9), 0))
    secs = {k: statistics.median(v) for k, v in time_alternating(
        {k: tr.train_step for k, tr in trainers.items()}, rounds=settings["timing_rounds"],
        calls=settings["timing_calls"]).items()}
    step_flops = {name_of(*s): 3 * dit_flops(config_of(*s)) * settings["batch_size"] for s in settings["grid"]}
    names = list(secs)
    rate = statistics.median(step_flops[k] / secs[k] for k in names)  # one constant: achieved FLOP/s
    # two constants, least squares: seconds = overhead + FLOPs / rate2
    xs, ys = [step_flops[k] for k in names], [secs[k] for k in names]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    overhead = my - slope * mx
    return [{"config": k, "step_flops": step_flops[k], "seconds": round(secs[k], 5),
             "predicted_flops_only": round(step_flops[k] / rate, 5),
             "ratio_flops_only": round(secs[k] / (step_flops[k] / rate), 3),
             "predicted_with_overhead": round(overhead + slope * step_flops[k], 5),
             "ratio_with_overhead": round(secs[k] / (overhead + slope * step_flops[k]), 3),
             "achieved_gflops_per_s": round(step_flops[k] / secs[k] / 1e9, 1)} for k in names], \
        {"rate_gflops_per_s": round(rate / 1e9, 1), "overhead_ms": round(1e3 * overhead, 2),
         "rate2_gflops_per_s": round(1 / slope / 1e9, 1) if slope > 0 else None}


def pearson(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.mean(xs), statistics.mean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    return sxy / math.sqrt(sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))


def summarise(rows: list[dict], settings: dict) -> tuple[list[dict], dict]:
    final = [r for r in rows if r["step"] == settings["steps"]]
    out = []
    for spec in settings["grid"]:
        rs = [r for r in final if r["config"] == name_of(*spec)]
        if not rs:
            continue
        fids, accs = [r["fid"] for r in rs], [r["conditional_accuracy"] for r in rs]
        out.append({k: rs[0][k] for k in ("config", "width", "depth", "patch", "tokens", "params", "flops",
                                          "train_flops")}
                   | {"seeds": len(rs), "fid_mean": round(statistics.mean(fids), 4),
                      "fid_std": round(statistics.stdev(fids), 4) if len(fids) > 1 else None,
                      "fid_min": min(fids), "fid_max": max(fids),
                      "fid_ratio_mean": round(statistics.mean(r["fid_ratio"] for r in rs), 2),
                      "conditional_accuracy_mean": round(statistics.mean(accs), 4),
                      "conditional_accuracy_std": round(statistics.stdev(accs), 4) if len(accs) > 1 else None})
    corr = {}
    if len(out) > 2:
        log_fid = [math.log(s["fid_mean"]) for s in out]
        corr = {"log_fid_vs_log_flops": round(pearson([math.log(s["flops"]) for s in out], log_fid), 3),
                "log_fid_vs_log_params": round(pearson([math.log(s["params"]) for s in out], log_fid), 3)}
    return out, corr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 small configs, 20 steps, N = 100: checks the script runs")
    p.add_argument("--seeds", help="comma-separated seeds")
    p.add_argument("--steps", type=int, help="training steps (the last eval step follows)")
    p.add_argument("--n", type=int, help="samples per evaluation")
    p.add_argument("--configs", help="comma-separated subset of the grid's names, e.g. w64-L2/7,w128-L4/4")
    p.add_argument("--no-timing", action="store_true", help="skip the step-time check of the cost model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write rows + summary here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = dict(QUICK if args.quick else FULL)
    if args.steps:
        settings["eval_steps"] = sorted({s for s in settings["eval_steps"] if s < args.steps} | {args.steps})
        settings["steps"] = args.steps
    settings["n"] = args.n or settings["n"]
    if args.seeds:
        settings["seeds"] = [int(s) for s in args.seeds.split(",")]
    if args.configs:
        names = {name_of(*s): s for s in GRID + QUICK["grid"]}
        unknown = set(args.configs.split(",")) - set(names)
        if unknown:
            p.error(f"unknown configs {sorted(unknown)}; the grid is {sorted(names)}")
        settings["grid"] = [names[c] for c in args.configs.split(",")]
    images, labels = mnist_tensors("train")
    t_start = time.perf_counter()
    timing, fit = ([], {}) if args.no_timing else time_steps(settings, images, labels)
    for t in timing:
        print(f"{t['config']:11s} {t['step_flops'] / 1e9:6.2f} GFLOP/step  {1e3 * t['seconds']:7.1f} ms  "
              f"FLOPs-only ×{t['ratio_flops_only']:.2f}  with overhead ×{t['ratio_with_overhead']:.2f}",
              file=sys.stderr)
    out = {"benchmark": "scaling", "quick": args.quick,
           "command": command_line("python benchmarks/scaling.py", argv), "settings": settings, "sampling": SAMPLE,
           "split": "train", "reference": "test", "timing": timing, "timing_fit": fit}
    rows = []
    for seed in settings["seeds"]:
        for spec in settings["grid"]:
            rows += run_one(spec, seed, settings, images, labels, progress=not args.quick)
            r = rows[-1]
            print(f"{r['config']:11s} seed {seed}: {r['params']:,} params, {r['flops'] / 1e6:.1f} MFLOPs, acc "
                  f"{r['conditional_accuracy']:.3f}, FID {r['fid']:.3f} (floor {r['fid_floor']:.3f}), "
                  f"{r['train_seconds']:.0f} s", file=sys.stderr)
            summary, corr = summarise(rows, settings)
            out.update(complete=False, rows=rows, summary=summary, correlation=corr)  # a long run keeps its rows
            save_result(args.json, out)
    summary, corr = summarise(rows, settings)
    out.update(complete=True, rows=rows, summary=summary, correlation=corr,
               total_seconds=round(time.perf_counter() - t_start, 1), machine=machine())
    save_result(args.json, out)
    for s in summary:
        print(f"{s['config']:11s} params {s['params']:>9,}  MFLOPs {s['flops'] / 1e6:6.1f}  FID {s['fid_mean']:.3f}"
              f" ± {s['fid_std'] or 0:.3f}  acc {s['conditional_accuracy_mean']:.3f}")
    print(f"correlation of log FID with log FLOPs / log params: {corr}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
