"""Why adaLN-Zero? DiT's conditioning ablation (Table 4) at MNIST scale, five variants, several seeds.

Every variant is the course's flagship DiT (patch 7 → 16 tokens, width 128, depth 4) with one block design
(`minidit.variants.conditioning`): in-context, cross-attention, adaLN (no gates), adaLN-gated (DiT's block with
gates but ordinary initialisation) and adaLN-Zero (gates, zero-initialised). Same steps, batch, data order and seeds;
only the way t and y enter the blocks differs. Samples: 20 Euler steps, no guidance (Table 4's FIDs are unguided),
scored by conditional accuracy and feature-FID beside the real-vs-real floor at the same N (`minidit.metrics`).

Two stages, so that no setting is chosen on the digits the figures are reported on:
  --tune   trains every variant at each learning rate of LR_GRID on the "fit" split (3,500 digits) and scores it
           against the "val" split (500 digits) for each sampling shift of SHIFT_GRID: the best lr per variant and
           the best shared shift (mean val FID), a check of the one lr and shift all variants share (LR, SHIFT).
  default  trains every variant with that lr on the "train" split (fit + val) for each seed and scores it
           against the 1,000 held-out "test" digits, at checkpoints along training (DiT's Figure 5) and at the end.

    python benchmarks/conditioning_ablation.py --tune --json benchmarks/results/conditioning_ablation_tune.json
    python benchmarks/conditioning_ablation.py --threads 1 --json benchmarks/results/conditioning_ablation_full.json
    python benchmarks/conditioning_ablation.py --quick --json /tmp/abl.json        # smoke run, seconds per variant

FLOPs are forward FLOPs per image (variants.cost.dit_flops; ×3 per image for training). Models train on the CPU fast
path (`variants.speed.use_fast_attention`), in fp32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from minidit.data import mnist_tensors
from minidit.metrics import evaluate
from minidit.runinfo import command_line, machine, save_result
from minidit.sampling import sample
from minidit.train import TrainConfig, Trainer
from minidit.variants.conditioning import AblationConfig, AblationDiT
from minidit.variants.cost import dit_flops
from minidit.variants.speed import use_fast_attention

VARIANTS = ["in-context", "cross-attention", "adaln", "adaln-gated", "adaln-zero"]
# DiT Table 4 (DiT-XL/2, 256², 400K steps, FID-50K without guidance): params, Gflops (multiply-adds), FID.
# The paper has no "adaln-gated" row: its adaLN-Zero changed gates and initialisation together.
DIT_TABLE_4 = {"in-context": {"fid": 35.24, "params": 449e6, "gflops": 119.37},
               "cross-attention": {"fid": 26.14, "params": 598e6, "gflops": 137.62},
               "adaln": {"fid": 25.21, "params": 600e6, "gflops": 118.56},
               "adaln-zero": {"fid": 19.47, "params": 675e6, "gflops": 118.64}}
MODEL = dict(patch_size=7, dim=128, depth=4, num_heads=4)  # = minidit.models.get_config("mnist-p7")
LR_GRID = [1e-3, 2e-3, 4e-3]
SHIFT_GRID = [1.0, 3.0]
# One lr for every variant and no sampling shift, as DiT's Table 4 trained every row with one set of settings.
# --tune asks whether a per-variant lr would change the picture; it has not been run, so the committed result
# (benchmarks/results/conditioning_ablation_full.json) uses these.
LR = {"in-context": 2e-3, "cross-attention": 2e-3, "adaln": 2e-3, "adaln-gated": 2e-3, "adaln-zero": 2e-3}
SHIFT = 1.0
FULL = dict(model=MODEL, steps=1000, batch_size=64, warmup_steps=100, ema_decay=0.999, n=1000, seeds=[0, 1, 2],
            eval_steps=[250, 500, 1000])
TUNE = dict(FULL, n=500, seeds=[0], eval_steps=[500, 1000])
QUICK = dict(model=dict(patch_size=7, dim=64, depth=2, num_heads=2), steps=100, batch_size=32, warmup_steps=10,
             ema_decay=0.99, n=100, seeds=[0, 1], eval_steps=[50, 100])  # smoke only: not a result
SAMPLE = dict(steps=20, sampler="euler", cfg_scale=1.0)


def scores(model, n: int, seed: int, shift: float, reference: str) -> dict:
    """Conditional accuracy, feature-FID and its floor of n class-balanced unguided samples (fixed noise)."""
    labels = torch.arange(10).repeat_interleave(n // 10 + 1)[:n]
    imgs = sample(model, labels, shift=shift, generator=torch.Generator().manual_seed(1000 + seed), **SAMPLE)
    m = evaluate(imgs.clamp(-1, 1), labels, reference=reference)
    return {"conditional_accuracy": round(m["conditional_accuracy"], 4), "fid": round(m["fid"], 4),
            "fid_floor": round(m["fid_floor"], 4), "fid_ratio": round(m["fid_ratio"], 2),
            "precision": round(m["precision"], 3), "recall": round(m["recall"], 3)}


@torch.no_grad()
def gate_sizes(model: AblationDiT) -> list[float] | None:
    """Mean |gate| (α of attention and MLP) per block over 256 random (t, y): how far each block is switched on."""
    if model.config.conditioning not in ("adaln-zero", "adaln-gated"):
        return None
    g = torch.Generator().manual_seed(0)
    c = model.t_embedder(torch.rand(256, generator=g)) + model.y_embedder(torch.randint(0, 10, (256,), generator=g))
    out = []
    for block in model.blocks:
        _, _, gate_msa, _, _, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)  # (256, D) each
        out.append(round(float(torch.cat([gate_msa, gate_mlp]).abs().mean()), 4))
    return out


def train_and_score(variant: str, seed: int, lr: float, settings: dict, split: str, reference: str,
                    shifts: list[float], progress: bool) -> tuple[dict, list[dict]]:
    """Train one variant; score its EMA at every eval step (each shift). Returns (final row, curve rows)."""
    images, labels = mnist_tensors(split)
    torch.manual_seed(seed)
    model = use_fast_attention(AblationDiT(AblationConfig(**settings["model"], conditioning=variant)))
    cfg = TrainConfig(steps=settings["steps"], batch_size=settings["batch_size"], lr=lr,
                      warmup_steps=settings["warmup_steps"], ema_decay=settings["ema_decay"], seed=seed)
    curve = []

    def at_checkpoint(tr: Trainer) -> None:
        if tr.step in settings["eval_steps"]:
            for shift in shifts:
                curve.append({"variant": variant, "seed": seed, "lr": lr, "shift": shift, "step": tr.step,
                              "train_seconds": round(tr.train_seconds, 1),
                              **scores(tr.ema, settings["n"], seed, shift, reference)})

    gates_at_init = gate_sizes(model)
    tr = Trainer(model, images, labels, cfg).run(progress=progress, callback=at_checkpoint)
    flops = dit_flops(model.config)
    final = dict(curve[-1], params=model.num_params(), flops=flops, train_flops=3 * flops * cfg.batch_size * tr.step,
                 final_loss=round(tr.history[-1]["loss"], 5), n=settings["n"], gates_at_init=gates_at_init,
                 gates_trained=gate_sizes(tr.ema))
    return final, curve


def spread(values: list[float]) -> dict:
    return {"mean": round(statistics.mean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for v in VARIANTS:
        rs = [r for r in rows if r["variant"] == v]
        if not rs:
            continue
        fid, acc, ratio = (spread([r[k] for r in rs]) for k in ("fid", "conditional_accuracy", "fid_ratio"))
        out.append({"variant": v, "params": rs[0]["params"], "flops": rs[0]["flops"], "lr": rs[0]["lr"],
                    "seeds": len(rs), "fid_mean": fid["mean"], "fid_std": fid["std"], "fid_min": fid["min"],
                    "fid_max": fid["max"], "fid_ratio_mean": ratio["mean"], "fid_ratio_std": ratio["std"],
                    "conditional_accuracy_mean": acc["mean"], "conditional_accuracy_std": acc["std"],
                    "conditional_accuracy_min": acc["min"], "conditional_accuracy_max": acc["max"],
                    "dit_table4_fid": DIT_TABLE_4.get(v, {}).get("fid")})
    return out


def separated(rows: list[dict], a: str, b: str, key: str = "fid") -> bool:
    """Is every seed of variant a better (lower FID / higher accuracy) than every seed of variant b?"""
    xa, xb = [r[key] for r in rows if r["variant"] == a], [r[key] for r in rows if r["variant"] == b]
    if not xa or not xb:
        return False
    return max(xa) < min(xb) if key == "fid" else min(xa) > max(xb)


def tune(settings: dict, variants: list[str], lrs: list[float], shifts: list[float], progress: bool) -> dict:
    rows, curves = [], []
    for v in variants:
        for lr in lrs:
            _, curve = train_and_score(v, settings["seeds"][0], lr, settings, "fit", "val", shifts, progress)
            rows += [r for r in curve if r["step"] == settings["steps"]]
            curves += curve
            for r in rows[-len(shifts):]:
                print(f"{v:15s} lr {lr:g} shift {r['shift']:g}: val acc {r['conditional_accuracy']:.3f}, "
                      f"FID {r['fid']:.3f} (floor {r['fid_floor']:.3f})", file=sys.stderr)
    best_lr = {v: min((r for r in rows if r["variant"] == v), key=lambda r: r["fid"])["lr"] for v in variants}
    per_shift = {s: statistics.mean(r["fid"] for r in rows if r["shift"] == s and r["lr"] == best_lr[r["variant"]])
                 for s in shifts}
    return {"rows": rows, "curves": curves, "best_lr": best_lr, "mean_val_fid_by_shift": {str(s): round(f, 4)
                                                                         for s, f in per_shift.items()},
            "best_shift": min(per_shift, key=per_shift.get)}


def results(rows: list[dict], curves: list[dict], variants: list[str], complete: bool) -> dict:
    """The result fields of a default run: rows, curves, summary, rankings and which pairs every seed separates."""
    summary = summarise(rows)
    by_fid = [s["variant"] for s in sorted(summary, key=lambda s: s["fid_mean"])]
    dit_order = [v for v in sorted(DIT_TABLE_4, key=lambda v: DIT_TABLE_4[v]["fid"]) if v in by_fid]
    in_dit = [v for v in by_fid if v in DIT_TABLE_4]  # the ranking of DiT's four variants
    seeds = sorted({r["seed"] for r in rows})
    per_seed = {s: [r["variant"] for r in sorted((r for r in rows if r["seed"] == s), key=lambda r: r["fid"])]
                for s in seeds}
    pairs = {f"{a} < {b}": {"fid": separated(rows, a, b), "accuracy": separated(rows, a, b, "conditional_accuracy")}
             for a in variants for b in variants if a != b}
    return {"complete": complete, "split": "train", "reference": "test", "lr": {v: LR[v] for v in variants},
            "shift": SHIFT, "rows": rows, "curves": curves, "summary": summary, "ranking_by_mean_fid": by_fid,
            "dit_ranking": dit_order, "ranking_holds_on_mean": in_dit == dit_order, "ranking_per_seed": per_seed,
            "ranking_holds_for_every_seed": all([v for v in r if v in DIT_TABLE_4] == dit_order
                                                for r in per_seed.values()),
            "separated_every_seed": pairs, "dit_table4": DIT_TABLE_4}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--tune", action="store_true", help="choose lr per variant and the shift on fit → val")
    mode.add_argument("--quick", action="store_true", help="a tiny model and budget: checks that the script runs")
    p.add_argument("--seeds", help="comma-separated seeds")
    p.add_argument("--steps", type=int, help="training steps (the last eval step follows)")
    p.add_argument("--n", type=int, help="samples per evaluation")
    p.add_argument("--lrs", help="comma-separated learning rates for --tune")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write rows + summary here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = dict(TUNE if args.tune else QUICK if args.quick else FULL)
    if args.steps:
        settings["eval_steps"] = sorted({s for s in settings["eval_steps"] if s < args.steps} | {args.steps})
        settings["steps"] = args.steps
    settings["n"] = args.n or settings["n"]
    if args.seeds:
        settings["seeds"] = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS):
        p.error(f"--variants must be a subset of {VARIANTS}")
    progress = not args.quick
    t_start = time.perf_counter()
    out = {"benchmark": "conditioning_ablation", "mode": "tune" if args.tune else "quick" if args.quick else "full",
           "quick": args.quick, "command": command_line("python benchmarks/conditioning_ablation.py", argv),
           "settings": settings, "sampling": SAMPLE}
    if args.tune:
        lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else LR_GRID
        out.update(split="fit", reference="val", lr_grid=lrs, shift_grid=SHIFT_GRID,
                   **tune(settings, variants, lrs, SHIFT_GRID, progress))
        out.update(total_seconds=round(time.perf_counter() - t_start, 1), machine=machine())
        save_result(args.json, out)
        print(f"best lr per variant (val FID): {out['best_lr']}; best shift: {out['best_shift']} "
              f"(mean val FID by shift {out['mean_val_fid_by_shift']})")
        return 0
    rows, curves = [], []
    for seed in settings["seeds"]:
        for v in variants:
            row, curve = train_and_score(v, seed, LR[v], settings, "train", "test", [SHIFT], progress)
            rows.append(row)
            curves += curve
            print(f"{v:15s} seed {seed}: {row['params']:,} params, {row['flops'] / 1e6:.1f} MFLOPs, acc "
                  f"{row['conditional_accuracy']:.3f}, FID {row['fid']:.3f} (floor {row['fid_floor']:.3f}), "
                  f"{row['train_seconds']:.0f} s", file=sys.stderr)
            out.update(results(rows, curves, variants, complete=False))  # a long run keeps what it has done
            save_result(args.json, out)
    out.update(results(rows, curves, variants, complete=True),
               total_seconds=round(time.perf_counter() - t_start, 1), machine=machine())
    summary, by_fid, dit_order = out["summary"], out["ranking_by_mean_fid"], out["dit_ranking"]
    save_result(args.json, out)
    for s in summary:
        print(f"{s['variant']:15s} params {s['params']:>9,}  MFLOPs {s['flops'] / 1e6:6.1f}  FID {s['fid_mean']:.3f}"
              f" ± {s['fid_std'] or 0:.3f}  acc {s['conditional_accuracy_mean']:.3f} ± "
              f"{s['conditional_accuracy_std'] or 0:.3f}  (DiT: {s['dit_table4_fid'] or '—'})")
    print(f"ranking by mean FID: {' < '.join(by_fid)}; DiT: {' < '.join(dit_order)}; "
          f"holds on the mean: {out['ranking_holds_on_mean']}, for every seed: {out['ranking_holds_for_every_seed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
