"""The cost model (FLOPs: variants.cost; memory: variants.speed) at high resolution, checked against this CPU.

    python benchmarks/cost_model.py --json benchmarks/results/cost_model.json --plot benchmarks/results/cost_model.png
    python benchmarks/cost_model.py --quick

1. Model only (the figure of notebook 12): a DiT-XL/2-sized network at 256–2048 px in pixel space and on
   8× / 16× latents with patch 1–8: tokens, forward GFLOPs per image (DiT's accounting), attention's share of
   them, and bf16 training activation memory per image (as trained on a GPU, with SDPA).
2. Check, on this machine: small DiTs that vary tokens (image size × patch, 4,096 tokens per batch), depth and
   width, on the CPU fast path the recipes train with (`variants.speed.use_fast_attention`, which the memory model
   assumes on a CPU). For each, one forward + backward in fp32 is timed (alternating rounds) and its peak memory
   measured with torch.profiler's allocation events (`variants.speed.peak_memory_bytes`; RSS would report glibc's
   cached pages, not the peak).
   Predicted time = model FLOPs ÷ the median achieved FLOP/s of all configs (one calibration constant);
   predicted memory = `dit_training_peak_bytes` (no calibration). Rows give measured ÷ predicted.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

import torch

from minidit.models import DiT, DiTConfig, get_config
from minidit.runinfo import command_line, machine, save_result
from minidit.variants.cost import dit_cost_at, train_flops_per_image
from minidit.variants.speed import (
    dit_activation_bytes,
    dit_training_peak_bytes,
    peak_memory_bytes,
    saved_tensor_bytes,
    time_alternating,
    use_fast_attention,
)
from minidit.viz import save_figure

RESOLUTIONS = [256, 512, 1024, 2048]
SPACES = [(1, 2), (1, 4), (1, 8), (1, 16), (8, 1), (8, 2), (8, 4), (16, 1), (16, 2)]  # (latent factor, patch)


def model_table(name: str = "DiT-XL/2") -> list[dict]:
    base = get_config(name)
    rows = []
    for res in RESOLUTIONS:
        for f, p in SPACES:
            r = dit_cost_at(base, res, latent_factor=f, patch_size=p)
            at = replace(base, input_size=res // f, patch_size=p)
            r["activation_mb"] = dit_activation_bytes(at, bf16=True, device="cuda") / 2**20  # GPU-scale: SDPA
            rows.append({"model": name, **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}})
    return rows


def check_configs(quick: bool) -> list[tuple[str, DiTConfig, int]]:
    """(label, config, batch): tokens 16 → 256 (1024 in the full run) at a constant 4,096 tokens per batch,
    depth 2 → 8 and width 128 → 384 at 64 tokens."""
    base = dict(in_channels=1, num_classes=10, dim=256, depth=4, num_heads=4)
    rows = [
        ("T=16", DiTConfig(input_size=16, patch_size=4, **base), 256),
        ("T=64", DiTConfig(input_size=16, patch_size=2, **base), 64),
        ("T=256", DiTConfig(input_size=32, patch_size=2, **base), 16),
        ("L=2", DiTConfig(input_size=16, patch_size=2, **{**base, "depth": 2}), 64),
        ("L=8", DiTConfig(input_size=16, patch_size=2, **{**base, "depth": 8}), 64),
        ("D=128", DiTConfig(input_size=16, patch_size=2, **{**base, "dim": 128}), 64),
        ("D=384", DiTConfig(input_size=16, patch_size=2, **{**base, "dim": 384, "num_heads": 6}), 64),
    ]
    if not quick:
        rows.insert(3, ("T=1024", DiTConfig(input_size=64, patch_size=2, **base), 4))
    return rows


def measured_rows(quick: bool, rounds: int) -> list[dict]:
    configs = check_configs(quick)
    fns, inputs, models = {}, {}, {}
    for label, c, batch in configs:
        model = use_fast_attention(DiT(c)).train()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=g)
        t, y = torch.rand(batch, generator=g), torch.randint(0, c.num_classes, (batch,), generator=g)
        models[label], inputs[label] = model, (x, t, y)

        def step(model=model, x=x, t=t, y=y):
            model(x, t, y).square().mean().backward()
            model.zero_grad(set_to_none=True)

        fns[label] = step
    times = time_alternating(fns, rounds=rounds)
    rows = []
    for label, c, batch in configs:
        model, (x, t, y) = models[label], inputs[label]
        flops = batch * train_flops_per_image(c)
        peak = peak_memory_bytes(fns[label])
        saved = saved_tensor_bytes(lambda model=model, x=x, t=t, y=y: model(x, t, y), model.parameters())
        sec = statistics.median(times[label])
        rows.append({"config": label, "tokens": c.num_tokens, "depth": c.depth, "dim": c.dim, "batch": batch,
                     "train_gflops": flops / 1e9, "seconds": round(sec, 4),
                     "achieved_gflops_per_s": round(flops / sec / 1e9, 1),
                     "peak_mb": round(peak / 2**20, 2),
                     "predicted_peak_mb": round(dit_training_peak_bytes(c, batch) / 2**20, 2),
                     "saved_activation_mb": round(saved / 2**20, 2),
                     "predicted_activation_mb": round(dit_activation_bytes(c, batch) / 2**20, 2)})
    rate = statistics.median(r["achieved_gflops_per_s"] for r in rows)  # the one calibration constant
    for r in rows:
        r["predicted_seconds"] = round(r["train_gflops"] / rate, 4)
        r["time_ratio"] = round(r["seconds"] / r["predicted_seconds"], 3)
        r["peak_ratio"] = round(r["peak_mb"] / r["predicted_peak_mb"], 3)
        r["activation_ratio"] = round(r["saved_activation_mb"] / r["predicted_activation_mb"], 3)
    return rows


def plot(table: list[dict], rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for f, p in SPACES:
        pts = [r for r in table if r["latent_factor"] == f and r["patch_size"] == p]
        label = f"{'pixels' if f == 1 else f'latent /{f}'}, patch {p}"
        ax[0].loglog([r["image_size"] for r in pts], [r["gflops"] for r in pts], "o-", label=label)
        ax[1].loglog([r["image_size"] for r in pts], [r["activation_mb"] for r in pts], "o-", label=label)
    ax[0].set(xlabel="image side (px)", ylabel="forward GFLOPs / image", title="DiT-XL/2-sized network: compute")
    ax[1].set(xlabel="image side (px)", ylabel="bf16 activation MB / image", title="training activation memory")
    ax[0].legend(fontsize=7)
    ax[2].scatter([r["predicted_seconds"] for r in rows], [r["seconds"] for r in rows], label="step time (s)")
    ax[2].scatter([r["predicted_peak_mb"] / 1000 for r in rows], [r["peak_mb"] / 1000 for r in rows],
                  marker="x", label="peak memory (GB)")
    lim = [min(min(r["predicted_seconds"], r["seconds"]) for r in rows) / 2,
           max(max(r["predicted_peak_mb"] / 1000, r["seconds"]) for r in rows) * 2]
    ax[2].loglog(lim, lim, "k--", lw=0.8)
    ax[2].set(xlabel="predicted", ylabel="measured", title="model vs this CPU")
    ax[2].legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="save the figure here (png)")
    ap.add_argument("--quick", action="store_true", help="skip the 1024-token config, one round")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = machine()
    table = model_table()
    for r in table:
        if r["image_size"] in (256, 1024):
            space = "pixels" if r["latent_factor"] == 1 else f"latent/{r['latent_factor']}"
            print(f"{r['image_size']:5d} px, {space:9s} patch {r['patch_size']:2d}: {r['tokens']:7d} tokens, "
                  f"{r['gflops']:10.1f} GFLOPs, attention "
                  f"{100 * r['attention_share']:4.1f}%, {r['activation_mb']:9.1f} MB activations/image (bf16)")
    rows = measured_rows(args.quick, rounds=1 if args.quick else 3)
    for r in rows:
        print(f"{r['config']:7s} T={r['tokens']:4d} L={r['depth']} D={r['dim']:3d} B={r['batch']:2d}: "
              f"{r['seconds']:.3f} s (model {r['predicted_seconds']:.3f}, ×{r['time_ratio']:.2f}), "
              f"{r['achieved_gflops_per_s']:.0f} GFLOP/s; peak {r['peak_mb']:.1f} MB "
              f"(model {r['predicted_peak_mb']:.1f}, ×{r['peak_ratio']:.2f}); saved activations "
              f"×{r['activation_ratio']:.2f}")
    result = {"command": command_line("python benchmarks/cost_model.py", argv), "machine": info,
              "memory_method": "torch.profiler profile_memory=True: running sum of allocation events, max",
              "model_table": table, "measured": rows}
    if args.plot:
        plot(table, rows, args.plot)
    save_result(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
