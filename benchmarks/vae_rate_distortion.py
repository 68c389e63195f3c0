"""Rate–distortion of the course's VAE on MNIST: how much each downsampling factor f and channel count c keeps.

For each (f, c): values kept per digit (c·(32/f)², vs 784 pixels), the KL rate in bits per digit, held-out MSE and
PSNR, the shipped classifier's accuracy on held-out reconstructions (vs on the originals), and the feature-FID of
reconstructed training digits against the held-out digits beside the real-vs-real floor — the "quality ceiling"
of a latent diffusion model that would reproduce the training latents exactly.
All VAEs use the same training settings (`minidit.pipeline.train_vae`, as `minidit vae train` trains them).

    python benchmarks/vae_rate_distortion.py --quick --json /tmp/rd.json
    python benchmarks/vae_rate_distortion.py --json benchmarks/results/vae_rate_distortion.json \
        --plot benchmarks/results/vae_rate_distortion.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from minidit.checkpoint import read_meta
from minidit.data import mnist_tensors
from minidit.metrics import evaluate, stratified_real
from minidit.pipeline import train_vae
from minidit.runinfo import command_line, machine, save_result
from minidit.vae import VAEConfig, evaluate_vae, load_vae, reconstruct, save_vae
from minidit.viz import save_figure

FULL = dict(configs=[(2, 1), (2, 4), (4, 2), (4, 4), (8, 4), (8, 16)], steps=2000, batch_size=64, lr=2e-3)
QUICK = dict(configs=[(4, 4), (8, 4)], steps=60, batch_size=64, lr=2e-3)


def reusable(path: Path, cfg: VAEConfig, settings: dict, seed: int) -> bool:
    """A saved VAE trained with exactly this config and these settings (e.g. the shipped one) need not be retrained."""
    if not path.is_file():
        return False
    meta = read_meta(path)
    same = {k: meta.get(k) for k in ("steps", "batch_size", "lr", "seed")} == {**{k: settings[k] for k in (
        "steps", "batch_size", "lr")}, "seed": seed}
    return meta.get("kind") == "vae" and meta.get("config") == cfg.to_dict() and same


def measure(factor: int, channels: int, settings: dict, seed: int, save_dir: str | None,
            reuse_dir: str | None = None) -> dict:
    cfg = VAEConfig(factor=factor, latent_channels=channels)
    x, _ = mnist_tensors("train")
    reuse = Path(reuse_dir or ".") / f"vae_mnist_f{factor}c{channels}.safetensors"
    if reuse_dir and reusable(reuse, cfg, settings, seed):
        vae, info = load_vae(reuse), read_meta(reuse)
        info["reused"] = str(reuse)
    else:
        vae, info = train_vae(cfg, x, steps=settings["steps"], batch_size=settings["batch_size"], lr=settings["lr"],
                              seed=seed, progress=False)
    xt, yt = mnist_tensors("test")
    held = evaluate_vae(vae, xt, yt)
    xr, yr = stratified_real(1000)  # reconstructed training digits vs the held-out digits
    ceiling = evaluate(reconstruct(vae, xr), yr)
    if save_dir:
        save_vae(Path(save_dir) / f"vae_mnist_f{factor}c{channels}.safetensors", vae, {**info, "held_out": held})
    return {"factor": factor, "latent_channels": channels, "latent_shape": list(cfg.latent_shape),
            "values_kept": cfg.values_kept, "compression": round(784 / cfg.values_kept, 2),
            "kl_bits": round(held["kl_bits"], 1), "mse": round(held["mse"], 5), "psnr": round(held["psnr"], 2),
            "classifier_accuracy_reconstructed": held["classifier_accuracy_reconstructed"],
            "classifier_accuracy_original": held["classifier_accuracy_original"],
            "recon_fid": round(ceiling["fid"], 4), "fid_floor": round(ceiling["fid_floor"], 4),
            "recon_fid_ratio": round(ceiling["fid_ratio"], 2), "n_fid": ceiling["n"],
            "params": sum(p.numel() for p in vae.parameters()), "scale": round(info["scale"], 4),
            "posterior_std": round(info["posterior_std"], 4), "train_seconds": info["train_seconds"],
            "steps": settings["steps"], "reused_checkpoint": info.get("reused")}


def plot(rows: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for f, colour in ((2, "C0"), (4, "C1"), (8, "C2")):
        rs = sorted((r for r in rows if r["factor"] == f), key=lambda r: r["values_kept"])
        if not rs:
            continue
        v = [r["values_kept"] for r in rs]
        axes[0].plot(v, [r["psnr"] for r in rs], "o-", color=colour, label=f"f = {f}")
        axes[1].plot(v, [r["classifier_accuracy_reconstructed"] for r in rs], "o-", color=colour, label=f"f = {f}")
        for r in rs:
            axes[0].annotate(f"c={r['latent_channels']}", (r["values_kept"], r["psnr"]), fontsize=7,
                             textcoords="offset points", xytext=(3, -9))
    axes[1].axhline(rows[0]["classifier_accuracy_original"], color="k", ls="--", lw=1, label="original digits")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("latent values per digit (784 pixels)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("held-out PSNR (dB)")
    axes[1].set_ylabel("classifier accuracy on reconstructions")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two configs, 60 steps (CI smoke)")
    p.add_argument("--configs", help="e.g. '4x4,8x16' (factor x channels)")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save", help="folder to save every trained VAE")
    p.add_argument("--reuse", help="folder of saved VAEs (e.g. minidit/weights): one trained with identical config and "
                                   "settings is loaded instead of retrained")
    p.add_argument("--json")
    p.add_argument("--plot")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = dict(QUICK if args.quick else FULL)
    if args.configs:
        settings["configs"] = [tuple(int(v) for v in s.split("x")) for s in args.configs.split(",")]
    settings["steps"] = args.steps or settings["steps"]
    t0 = time.perf_counter()
    rows = []
    for f, c in settings["configs"]:
        rows.append(measure(f, c, settings, args.seed, args.save, args.reuse))
        r = rows[-1]
        print(f"f={f} c={c:2d}: {r['values_kept']:4d} values, {r['kl_bits']:6.0f} bits, PSNR {r['psnr']:.2f} dB, "
              f"classifier {r['classifier_accuracy_reconstructed']:.3f} (originals "
              f"{r['classifier_accuracy_original']:.3f}), recon-FID {r['recon_fid']:.3f} (floor {r['fid_floor']:.3f})"
              f", {r['train_seconds']:.0f} s", file=sys.stderr)
    out = {"benchmark": "vae_rate_distortion", "quick": args.quick,
           "command": command_line("python benchmarks/vae_rate_distortion.py", argv),
           "settings": {**settings, "kl_weight": VAEConfig().kl_weight, "held_out_n": 1000}, "rows": rows,
           "total_seconds": round(time.perf_counter() - t0, 1),
           "machine": machine()}
    save_result(args.json, out)
    if args.plot:
        plot(rows, args.plot)
    if not args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
