"""Caption faithfulness and attention maps: cross-attention DiT vs MMDiT on captioned shapes, at equal budget.

Both backbones share width, depth, heads, text encoder, data, steps, batch and learning rate. Reported per backbone:
- the learning curve: caption faithfulness per attribute (colour in the requested region, position, shape, size, all)
  without and with CFG, on captions seen in training and on held-out two-object combinations, at several step
  budgets (read from the shipped checkpoint's JSON, or measured here with --train);
- the final model's faithfulness on a larger caption sample;
- the word→object attention ratio on real images noised to t ∈ {0.25, 0.5, 0.75}: named object vs background and
  named object vs the other object (the control), per layer and per t;
- attention statistics by layer and by sampling step (the seed's "early layers = structure" hypothesis);
- CFG and attention: the conditional branch's weights at a fixed x_t for several scales.

    python benchmarks/caption_faithfulness.py --json out/caption_faithfulness.json        # the shipped weights
    python benchmarks/caption_faithfulness.py --json out/cf_quick.json --quick          # fewer samples (~minutes)
    python benchmarks/caption_faithfulness.py --json out/cf_train.json --train --seeds 0,1 --device cuda
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from minidit.attention_maps import attention_statistics, cfg_attention_check, object_attention_ratio
from minidit.checkpoint import load_model, save_model
from minidit.faithfulness import evaluation_captions, faithfulness_report
from minidit.pipeline import train_t2i
from minidit.runinfo import command_line, machine, save_result
from minidit.t2i import get_t2i_config

WEIGHTS = Path(__file__).resolve().parents[1] / "minidit" / "weights"
BACKBONES = ("dit", "mmdit")


def shipped(backbone: str) -> Path:
    return WEIGHTS / f"shapes_{backbone}.safetensors"


def train_with_curve(backbone: str, args, argv: list[str] | None, seed: int, eval_at: set[int]
                     ) -> tuple[torch.nn.Module, dict, dict]:
    """Train one backbone; score its EMA at each step in eval_at (outside the timed training steps)."""
    caps = evaluation_captions()
    curve: dict[int, dict] = {}

    def evaluate(tr) -> None:
        if tr.step in eval_at:
            curve[tr.step] = {"train_seconds": round(tr.train_seconds, 1), **faithfulness_report(tr.ema, caps)}
            print(f"  seed {seed} step {tr.step}: all = "
                  f"{ {k: v['cfg_1']['all'] for k, v in curve[tr.step].items() if k != 'train_seconds'} } (cfg 1)",
                  flush=True)

    trainer = train_t2i(get_t2i_config(f"shapes-{backbone}"), steps=args.steps, batch_size=args.batch_size,
                        lr=args.lr, seed=seed, progress=False, device=args.device, callback=evaluate)
    info = {"source": "trained here", "device": str(args.device), "steps": trainer.step,
            "batch_size": args.batch_size, "lr": args.lr, "train_seconds": round(trainer.train_seconds, 1),
            "final_loss": trainer.history[-1]["loss"]}
    if args.out_weights and seed == 0:  # as `minidit t2i` saves the shipped weights: the EMA in fp16 + its history
        save_model(Path(args.out_weights) / f"shapes_{backbone}.safetensors", trainer.ema, half=True,
                   train=asdict(trainer.cfg), step=trainer.step, train_seconds=trainer.train_seconds,
                   history=trainer.history, num_params=trainer.ema.num_params(),
                   command=command_line("python benchmarks/caption_faithfulness.py", argv),
                   config_name=f"shapes-{backbone}", curve=curve)
    return trainer.ema, info, curve


def final_evaluation(model, args, n_seen: int, n_held: int, n_attn: int, n_stats: int) -> dict:
    out: dict = {}
    t0 = time.perf_counter()
    out["faithfulness"] = faithfulness_report(model, evaluation_captions(n_seen, n_held, seed=1),
                                              scales=(1.0, args.cfg), steps=args.sample_steps)
    print(f"  faithfulness ({time.perf_counter() - t0:.0f} s): {out['faithfulness']}", flush=True)
    out["object_attention_ratio"] = object_attention_ratio(model, n=n_attn)
    for w, r in out["object_attention_ratio"].items():
        print(f"  word→object ({w}): vs background {r['ratio']['geo_mean']:.2f}, vs the other object "
              f"{r['vs_other']['geo_mean']:.2f} (>1 in {r['vs_other']['fraction_above_1']:.0%})", flush=True)
    stats_caps = evaluation_captions(n_stats, 1, seed=2)["seen"]
    out["layers_and_steps"] = attention_statistics(model, stats_caps, steps=args.sample_steps, cfg_scale=args.cfg,
                                                   seed=2)
    out["cfg_attention"] = cfg_attention_check(model, stats_caps[:8], scales=(1.0, args.cfg, 7.0))
    print(f"  CFG vs attention: {out['cfg_attention']}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="write the results here")
    p.add_argument("--quick", action="store_true", help="fewer samples for the final evaluation")
    p.add_argument("--train", action="store_true", help="retrain both backbones (equal budget) instead of loading")
    p.add_argument("--steps", type=int, default=1500, help="training steps (with --train)")
    p.add_argument("--eval-at", default="250,500,750,1000,1500", help="learning-curve steps (with --train)")
    p.add_argument("--seeds", default="0", help="training seeds (with --train), e.g. 0,1")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cfg", type=float, default=3.0, help="the CFG scale compared with scale 1")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-weights", help="with --train: save the seed-0 models here (shapes_<backbone>.safetensors)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_seen, n_held, n_attn, n_stats = (40, 24, 16, 8) if args.quick else (300, 108, 64, 32)
    results: dict = {
        "command": command_line("python benchmarks/caption_faithfulness.py", argv),
        "machine": machine(args.device),
        "eval": {"curve_captions": {"seen": 100, "heldout": 54}, "final_captions": {"seen": n_seen, "heldout": n_held},
                 "cfg_scales": [1.0, args.cfg], "sample_steps": args.sample_steps, "sampler": "euler",
                 "attention_images": n_attn, "statistics_captions": n_stats},
        "models": {},
    }
    eval_at = {int(x) for x in args.eval_at.split(",") if x}
    for backbone in BACKBONES:
        print(f"== {backbone}", flush=True)
        if args.train:
            curves = {}
            for seed in [int(s) for s in args.seeds.split(",")]:
                m, info_s, curves[seed] = train_with_curve(backbone, args, argv, seed, eval_at)
                if seed == int(args.seeds.split(",")[0]):
                    model, info = m, info_s
            info["curves_by_seed"] = curves
        else:
            if not shipped(backbone).is_file():
                raise SystemExit(f"{shipped(backbone)} is missing: run with --train, or train it with "
                                 f"minidit t2i --config shapes-{backbone} --out {shipped(backbone)}")
            model = load_model(shipped(backbone))
            meta = json.loads(shipped(backbone).with_suffix(".json").read_text())
            info = {"source": str(shipped(backbone).relative_to(WEIGHTS.parents[1])), "steps": meta["step"],
                    "batch_size": meta["train"]["batch_size"], "lr": meta["train"]["lr"],
                    "train_seconds": round(meta["train_seconds"], 1), "threads": meta.get("threads"),
                    "final_loss": meta["history"][-1]["loss"], "reproduce": meta.get("command"),
                    "curves_by_seed": {meta["train"]["seed"]: meta.get("curve", {})}}
        info["params"] = model.num_params()
        print(f"  {({k: v for k, v in info.items() if k != 'curves_by_seed'})}", flush=True)
        results["models"][backbone] = {"training": info,
                                       **final_evaluation(model.eval(), args, n_seen, n_held, n_attn, n_stats)}
    save_result(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
