"""Latent DiT vs pixel DiT on MNIST, at equal token count and at equal training wall-clock.

Four DiTs of the same width and depth, each trained for the same wall-clock budget (rectified flow, same lr, batch):
  pixel-64   pixels padded to 32×32 (as the VAE pads them), patch 4 → 64 tokens of 16 values
  pixel-16   pixels padded to 32×32, patch 8 → 16 tokens of 64 values
  latent-64  VAE latents (f = 4, c = 4: 4×8×8, z = scale · mean), patch 1 → 64 tokens of 4 values
  latent-16  the same latents, patch 2 → 16 tokens of 16 values
pixel-64 vs latent-64 and pixel-16 vs latent-16 are the equal-token-count pairs (same transformer cost per step);
16 vs 64 tokens at equal wall-clock shows what fewer tokens buy. Each model samples N class-balanced digits
(Euler, 20 steps, CFG 2) that are cropped (pixels) or decoded (latents) to 28×28 and scored with the shipped
classifier: conditional accuracy and feature-FID beside the real-vs-real floor. The VAE's own ceiling
(reconstructed training digits) is reported too: a latent model cannot beat its decoder. Every model trains on the
CPU fast path the recipes use (`variants.speed.use_fast_attention`).

    python benchmarks/latent_vs_pixel.py --quick --json /tmp/latent.json                         # ≈ 2 min on 2 cores
    python benchmarks/latent_vs_pixel.py --json benchmarks/results/latent_vs_pixel_full.json     # ≈ 23 min
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from minidit.data import mnist_tensors
from minidit.metrics import evaluate, stratified_real
from minidit.models import DiT, DiTConfig
from minidit.pipeline import training_data
from minidit.runinfo import command_line, machine, save_result
from minidit.sampling import sample
from minidit.train import TrainConfig, Trainer
from minidit.vae import load_vae, reconstruct
from minidit.variants.cost import dit_flops
from minidit.variants.speed import use_fast_attention

FULL = dict(model=dict(dim=128, depth=4, num_heads=4), budget=300.0, max_steps=20000, batch_size=64, lr=2e-3,
            warmup_steps=50, ema_decay=0.999, n=1000)
QUICK = dict(model=dict(dim=64, depth=2, num_heads=2), budget=25.0, max_steps=20000, batch_size=64, lr=2e-3,
             warmup_steps=20, ema_decay=0.99, n=100)
SAMPLE = dict(steps=20, sampler="euler", cfg_scale=2.0)
PAD = 2  # 28 → 32, background value −1, the same padding the VAE uses


def run(name: str, space: str, patch: int, data: torch.Tensor, labels: torch.Tensor, vae, settings: dict,
        seed: int) -> dict:
    C, H = data.shape[1], data.shape[2]
    torch.manual_seed(seed)
    model = use_fast_attention(DiT(DiTConfig(input_size=H, in_channels=C, patch_size=patch, **settings["model"])))
    cfg = TrainConfig(steps=settings["max_steps"], batch_size=settings["batch_size"], lr=settings["lr"],
                      warmup_steps=settings["warmup_steps"], ema_decay=settings["ema_decay"], seed=seed,
                      time_budget=settings["budget"])
    tr = Trainer(model, data, labels, cfg).run(progress=False)
    n = settings["n"]
    lab = torch.arange(10).repeat_interleave(n // 10 + 1)[:n]
    t0 = time.perf_counter()
    out = sample(tr.ema, lab, generator=torch.Generator().manual_seed(seed + 1), **SAMPLE)  # (n, C, H, H)
    sample_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    imgs = vae.decode_latents(out) if space == "latent" else out[..., PAD:-PAD, PAD:-PAD].clamp(-1, 1)
    decode_s = time.perf_counter() - t0
    m = evaluate(imgs, lab)
    return {"name": name, "space": space, "input": list(data.shape[1:]), "patch_size": patch,
            "tokens": model.config.num_tokens, "values_per_token": patch * patch * C,
            "params": model.num_params(), "flops": dit_flops(model.config), "steps": tr.step,
            "train_seconds": round(tr.train_seconds, 1), "seconds_per_step": round(tr.train_seconds / tr.step, 4),
            "images_per_second": round(tr.step * cfg.batch_size / tr.train_seconds, 1),
            "sample_seconds": round(sample_s, 2), "decode_seconds": round(decode_s, 2), "n": n,
            "conditional_accuracy": round(m["conditional_accuracy"], 4), "fid": round(m["fid"], 4),
            "fid_floor": round(m["fid_floor"], 4), "fid_ratio": round(m["fid_ratio"], 2),
            "precision": round(m["precision"], 3), "recall": round(m["recall"], 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, 25 s each, N = 100 (CI smoke)")
    p.add_argument("--budget", type=float, help="training seconds per model")
    p.add_argument("--n", type=int)
    p.add_argument("--vae", default="vae_mnist_f4c4", help="VAE checkpoint (path or shipped name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = dict(QUICK if args.quick else FULL)
    settings["budget"] = args.budget or settings["budget"]
    settings["n"] = args.n or settings["n"]
    vae = load_vae(args.vae)
    x, y = mnist_tensors("train")
    pixels = F.pad(x, (PAD, PAD, PAD, PAD), value=-1.0)  # (N, 1, 32, 32)
    latents, encode_s = training_data(x, vae)  # (N, c, 8, 8), unit std
    xr, yr = stratified_real(settings["n"])
    ceiling = evaluate(reconstruct(vae, xr), yr)
    runs = [("pixel-64", "pixel", 4, pixels), ("latent-64", "latent", 1, latents),
            ("pixel-16", "pixel", 8, pixels), ("latent-16", "latent", 2, latents)]
    t_start = time.perf_counter()
    rows = []
    for name, space, patch, data in runs:
        rows.append(run(name, space, patch, data, y, vae, settings, args.seed))
        r = rows[-1]
        print(f"{name:10s} {r['tokens']:3d} tokens: {r['steps']:5d} steps in {r['train_seconds']:.0f} s "
              f"({r['seconds_per_step'] * 1000:.0f} ms/step); sample {r['sample_seconds']:.1f} s + decode "
              f"{r['decode_seconds']:.2f} s; acc {r['conditional_accuracy']:.3f}, FID {r['fid']:.3f} "
              f"(floor {r['fid_floor']:.3f})", file=sys.stderr)
    out = {"benchmark": "latent_vs_pixel", "quick": args.quick,
           "command": command_line("python benchmarks/latent_vs_pixel.py", argv),
           "settings": settings, "sampling": SAMPLE, "vae": args.vae, "vae_config": vae.config.to_dict(),
           "vae_scale": float(vae.scale), "vae_encode_seconds_train_set": round(encode_s, 2),
           "vae_ceiling": {"n": ceiling["n"], "conditional_accuracy": round(ceiling["conditional_accuracy"], 4),
                           "fid": round(ceiling["fid"], 4), "fid_floor": round(ceiling["fid_floor"], 4)},
           "rows": rows, "total_seconds": round(time.perf_counter() - t_start, 1),
           "machine": machine()}
    save_result(args.json, out)
    if not args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
