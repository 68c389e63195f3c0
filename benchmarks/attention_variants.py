"""Attention variants (minidit.variants.attention) measured: speed, memory and quality at MNIST scale.

    python benchmarks/attention_variants.py --json benchmarks/results/attention_variants.json   # ≈ 15 min, 2 cores
    python benchmarks/attention_variants.py --quick                                              # ≈ 1 min

Variants (the options of `VariantConfig`, a `VariantDiT` each): plain multi-head attention with sin-cos positions
(DiT, SD3), grouped-query attention (one shared key/value head = multi-query), ALiBi on the Euclidean patch distance,
2D RoPE, tiled attention (7×7-token tiles) without and with 4 pooled global tokens. ALiBi and RoPE replace the
absolute positions. Every model runs on the CPU fast path the recipes train with (`variants.speed.use_fast_attention`;
ALiBi's biased scores keep their own path).

1. Speed and memory: one forward + backward (fp32, training mode) of the same 4-block, width-128 DiT at 196 tokens
   (28², patch 2) and 1,024 tokens (64², patch 2), timed in alternating rounds; peak memory from torch.profiler's
   allocation events; parameters and model FLOPs (minidit.variants.cost).
2. Quality: each variant trains the same small patch-2 DiT on the bundled MNIST digits (same seed, steps, batch,
   lr, bf16 autocast), then its EMA weights are scored: held-out flow-matching loss (fixed t and noise) and,
   from N class-balanced CFG samples, conditional accuracy and feature-FID beside the real-vs-real floor.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from minidit.data import mnist_tensors
from minidit.flow import flow_loss
from minidit.metrics import evaluate
from minidit.runinfo import command_line, machine, save_result
from minidit.sampling import sample
from minidit.train import TrainConfig, Trainer
from minidit.variants.attention import VariantConfig, VariantDiT
from minidit.variants.cost import dit_flops
from minidit.variants.speed import peak_memory_bytes, time_alternating, use_fast_attention

VARIANTS: dict[str, dict] = {  # VariantConfig options
    "mha": {},
    "gqa-1kv": {"n_kv_heads": 1},
    "alibi-2d": {"alibi": "euclidean"},
    "rope-2d": {"rope": True},
    "window7": {"window": 7},
    "window7+4global": {"window": 7, "global_tokens": 4},
}


SPEED_MODEL = dict(patch_size=2, dim=128, depth=4, num_heads=4)  # timed at 196 and 1,024 tokens
QUALITY_MODEL = dict(patch_size=2, dim=64, depth=4, num_heads=4)  # trained on MNIST (196 tokens)


def with_window(attn: dict, grid: int) -> dict:
    """The windowed variants use grid/2-wide tiles at 1,024 tokens (16×16 of a 32×32 grid is too big; 8×8)."""
    if attn and attn.get("window") and grid % attn["window"]:
        return {**attn, "window": 8}
    return attn


def speed_rows(rounds: int, quick: bool) -> list[dict]:
    rows = []
    sizes = [(28, 4)] if quick else [(28, 32), (64, 4)]  # (image side, batch): 196 and 1,024 tokens
    for side, batch in sizes:
        fns, cfgs = {}, {}
        for name, attn in VARIANTS.items():
            attn = with_window(attn, side // 2)
            c = VariantConfig(input_size=side, **SPEED_MODEL, **attn)
            model = use_fast_attention(VariantDiT(c)).train()
            g = torch.Generator().manual_seed(0)
            x, t = torch.randn(batch, 1, side, side, generator=g), torch.rand(batch, generator=g)
            y = torch.randint(0, 10, (batch,), generator=g)

            def step(model=model, x=x, t=t, y=y):
                model(x, t, y).square().mean().backward()
                model.zero_grad(set_to_none=True)

            fns[name], cfgs[name] = step, (c, model, attn)
        times = time_alternating(fns, rounds=rounds)
        base = statistics.median(times["mha"])
        for name, (c, model, attn) in cfgs.items():
            sec = statistics.median(times[name])
            rows.append({"variant": name, "attn": attn or None, "tokens": c.num_tokens, "batch": batch,
                         "params": sum(p.numel() for p in model.parameters()),
                         "forward_gflops_per_image": round(dit_flops(c) / 1e9, 4),
                         "seconds_per_step": round(sec, 4), "time_vs_mha": round(sec / base, 3),
                         "peak_mb": round(peak_memory_bytes(fns[name]) / 2**20, 1)})
    return rows


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Flow-matching loss on held-out digits at 8 fixed times with fixed noise (lower is better)."""
    g = torch.Generator().manual_seed(123)
    losses = []
    for t_value in torch.linspace(0.05, 0.95, 8):
        noise = torch.randn(x.shape, generator=g)
        t = torch.full((x.shape[0],), float(t_value))
        losses.append(float(flow_loss(model, x, y, t, noise)))
    return sum(losses) / len(losses)


def quality_rows(steps: int, n_samples: int, seed: int) -> list[dict]:
    x, y = mnist_tensors("train")
    xt, yt = mnist_tensors("test")
    xt, yt = xt[:500], yt[:500]
    labels = torch.arange(n_samples) % 10
    cfg = TrainConfig(steps=steps, batch_size=64, lr=2e-3, warmup_steps=min(20, steps // 2), ema_decay=0.995,
                      bf16=True, seed=seed, log_every=max(1, steps // 10))
    rows = []
    for name, attn in VARIANTS.items():
        c = VariantConfig(**QUALITY_MODEL, **attn)
        torch.manual_seed(seed)
        trainer = Trainer(use_fast_attention(VariantDiT(c)), x, y, cfg)
        start = time.perf_counter()
        trainer.run(progress=False)
        train_s = time.perf_counter() - start
        ema = trainer.ema.eval()
        imgs = sample(ema, labels, steps=10, cfg_scale=2.0, generator=torch.Generator().manual_seed(seed))
        m = evaluate(imgs.clamp(-1, 1), labels)
        rows.append({"variant": name, "attn": attn or None, "steps": steps, "train_seconds": round(train_s, 1),
                     "final_train_loss": round(trainer.history[-1]["loss"], 4),
                     "heldout_loss": round(heldout_loss(ema, xt, yt), 4), "n_samples": n_samples,
                     "conditional_accuracy": round(m["conditional_accuracy"], 3), "fid": round(m["fid"], 2),
                     "fid_floor": round(m["fid_floor"], 2)})
        r = rows[-1]
        print(f"  {name:16s} train {train_s:5.1f} s, held-out loss {r['heldout_loss']:.4f}, "
              f"acc {r['conditional_accuracy']:.3f}, FID {r['fid']:.1f} (floor {r['fid_floor']:.1f})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="196 tokens only, few steps, N = 50")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="training steps per variant (default 250, quick 20)")
    ap.add_argument("--n", type=int, default=None, help="samples per variant (default 300, quick 50)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps or (20 if args.quick else 250)
    n = args.n or (50 if args.quick else 300)
    if steps < 2 or n < 10:
        ap.error("--steps must be ≥ 2 and --n ≥ 10")
    info = machine()
    speed = speed_rows(rounds=1 if args.quick else 3, quick=args.quick)
    for r in speed:
        print(f"{r['variant']:16s} T={r['tokens']:5d} B={r['batch']:2d}: {r['seconds_per_step']:.3f} s "
              f"(×{r['time_vs_mha']:.2f} of mha), peak {r['peak_mb']:7.1f} MB, {r['params']:,} params, "
              f"{r['forward_gflops_per_image']:.3f} GFLOPs/img", flush=True)
    print(f"quality: {steps} steps each, N = {n}", flush=True)
    quality = quality_rows(steps, n, args.seed)
    save_result(args.json, {"command": command_line("python benchmarks/attention_variants.py", argv), "machine": info,
                            "speed_model": SPEED_MODEL, "quality_model": QUALITY_MODEL,
                            "speed": speed, "quality": quality})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
