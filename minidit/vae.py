"""A small convolutional VAE: images ↔ latents, the reparameterisation trick, KL, and the latent scale factor.

encoder(x) → (mean, log-variance) per latent value → z = mean + σ·ε (reparameterised) → decoder(z) ≈ x.
Loss per image = Σ (x − x̂)² + kl_weight · KL(q(z|x) ‖ N(0, I)), divided by the number of pixels (so the
reconstruction term is the usual per-pixel MSE). kl_weight plays the role of 2σ² of a Gaussian decoder.

Shapes: the latent grid is (latent_channels, S/f, S/f) for an S×S input and downsampling factor f ∈ {2, 4, 8}.
MNIST digits are 28×28, which f = 8 does not divide: the VAE pads them with `pad` = 2 background pixels
(value −1) on every side to 32×32 before encoding and crops the decoder's 32×32 output back to 28×28.
So f = 2, 4, 8 give 16×16, 8×8, 4×4 latent grids for a 28×28 digit.

Latents for a diffusion model are z = scale · mean(x), with scale = 1 / std of those latents over the training
set (DESIGN §1), computed once after training and stored in the checkpoint — the role 0.18215 plays for Stable
Diffusion's VAE. We encode the posterior *mean* (not a sample): with the small KL weights used here the posterior
standard deviation is small next to the spread of the means (`info['posterior_std']` records it).

Train and ship (the shipped weights' JSON records the exact command and the measured held-out PSNR):
    python -m minidit.vae train --factor 4 --latent-channels 4 --out minidit/weights/vae_mnist_f4c4.safetensors
"""

from __future__ import annotations

import argparse
import importlib.resources
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minidit.checkpoint import config_from_dict, load_checkpoint, load_state, save_checkpoint
from minidit.runinfo import command_line


@dataclass(frozen=True)
class VAEConfig:
    """Architecture and loss weight of a VAE (saved as JSON beside every checkpoint)."""

    in_channels: int = 1
    image_size: int = 28  # H = W of the data
    pad: int = 2  # background pixels added on each side before encoding (28 + 2·2 = 32, divisible by 8)
    factor: int = 4  # spatial downsampling f ∈ {2, 4, 8}
    latent_channels: int = 4
    base_channels: int = 16  # conv width at full resolution; doubled per level, capped at max_channels
    max_channels: int = 64
    kl_weight: float = 1e-3
    pad_value: float = -1.0  # background of images in [−1, 1]

    def __post_init__(self):
        checks = {
            "in_channels": self.in_channels >= 1,
            "image_size": self.image_size >= 1,
            "pad": self.pad >= 0,
            "factor": self.factor in (1, 2, 4, 8),
            "latent_channels": self.latent_channels >= 1,
            "base_channels": self.base_channels >= 8 and self.base_channels % 8 == 0,
            "max_channels": self.max_channels >= self.base_channels and self.max_channels % 8 == 0,
            "kl_weight": self.kl_weight >= 0,
        }
        if (self.image_size + 2 * self.pad) % max(self.factor, 1):
            checks["factor"] = False
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                "invalid VAEConfig field(s) " + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
                + " (need factor in {1, 2, 4, 8} dividing image_size + 2·pad, channels multiples of 8, kl_weight ≥ 0)"
            )

    @property
    def padded_size(self) -> int:
        return self.image_size + 2 * self.pad

    @property
    def latent_size(self) -> int:
        return self.padded_size // self.factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_size, self.latent_size)

    @property
    def values_kept(self) -> int:
        """Latent values per image (c · (S/f)²)."""
        return self.latent_channels * self.latent_size**2

    def widths(self) -> list[int]:
        """Conv width at each resolution level 0 (full) … log2(f)."""
        levels = int(math.log2(self.factor))
        return [min(self.base_channels * 2**i, self.max_channels) for i in range(levels + 1)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        return config_from_dict(cls, d)


# ---- the three ingredients: reparameterisation, KL, scale ----------------------------------------------------
def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """z = μ + σ·ε with σ = exp(½·log σ²) and ε ~ N(0, I): a sample whose gradient flows into μ and log σ²."""
    if mean.shape != logvar.shape:
        raise ValueError(f"mean and logvar must have the same shape, got {tuple(mean.shape)} and {tuple(logvar.shape)}")
    if noise is None:
        noise = torch.randn_like(mean)
    if noise.shape != mean.shape:
        raise ValueError(f"noise must have shape {tuple(mean.shape)}, got {tuple(noise.shape)}")
    return mean + torch.exp(0.5 * logvar) * noise


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) = ½ Σ (μ² + σ² − 1 − log σ²), summed over all but the batch dim → (B,) in nats."""
    if mean.shape != logvar.shape or mean.ndim < 2:
        raise ValueError(f"need mean and logvar of the same shape (B, ...), got {tuple(mean.shape)}, "
                         f"{tuple(logvar.shape)}")
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1)  # (B,)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → 3×3 conv, twice, added to the input (the SD-VAE / ADM residual block without time)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class VAE(nn.Module):
    """Convolutional VAE: log2(f) stride-2 convs down to (latent_channels, S/f, S/f) and nearest-upsample convs back."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = c = config
        w = c.widths()  # no residual blocks at full resolution: they would cost most of the compute
        enc: list[nn.Module] = [nn.Conv2d(c.in_channels, w[0], 3, padding=1)]
        for i in range(len(w) - 1):
            enc += [nn.Conv2d(w[i], w[i + 1], 3, stride=2, padding=1), ResBlock(w[i + 1])]  # H → H/2
        enc += [nn.GroupNorm(8, w[-1]), nn.SiLU(), nn.Conv2d(w[-1], 2 * c.latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(c.latent_channels, w[-1], 3, padding=1), ResBlock(w[-1])]
        for i in reversed(range(len(w) - 1)):  # H → 2H
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w[i + 1], w[i], 3, padding=1)]
            dec += [ResBlock(w[i])] if i > 0 else []
        dec += [nn.GroupNorm(8, w[0]), nn.SiLU(), nn.Conv2d(w[0], c.in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        # 1 / std of the training set's latents; 1.0 until compute_scale() sets it. Saved with the weights.
        self.register_buffer("scale", torch.tensor(1.0))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_images(self, x: torch.Tensor) -> None:
        c = self.config
        want = (c.in_channels, c.image_size, c.image_size)
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"the VAE takes images (B, {want[0]}, {want[1]}, {want[2]}) in [-1, 1], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")

    def _check_latents(self, z: torch.Tensor) -> None:
        want = self.config.latent_shape
        if not isinstance(z, torch.Tensor) or z.ndim != 4 or tuple(z.shape[1:]) != want:
            raise ValueError(f"latents must be (B, {want[0]}, {want[1]}, {want[2]}), got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, S, S) → posterior mean and log-variance, each (B, c, S'/f, S'/f) with S' = S + 2·pad."""
        self._check_images(x)
        p = self.config.pad
        x = F.pad(x, (p, p, p, p), value=self.config.pad_value)  # (B, C, S', S')
        mean, logvar = self.encoder(x).chunk(2, dim=1)  # each (B, c, S'/f, S'/f)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, c, S'/f, S'/f) → images (B, C, S, S) (the padding border cropped off, not clamped)."""
        self._check_latents(z)
        x = self.decoder(z)  # (B, C, S', S')
        p = self.config.pad
        return x[..., p : x.shape[-2] - p, p : x.shape[-1] - p] if p else x  # (B, C, S, S)

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        """(reconstruction from a reparameterised sample, mean, logvar)."""
        mean, logvar = self.encode(x)
        return self.decode(reparameterize(mean, logvar, noise)), mean, logvar

    # ---- what a latent diffusion model uses ----------------------------------------------------------------
    @torch.no_grad()
    def encode_latents(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None,
                       batch_size: int = 500) -> torch.Tensor:
        """z = scale · (posterior mean, or a posterior sample if `sample`), in batches: the diffusion model's data."""
        out = []
        for i in range(0, x.shape[0], batch_size):
            mean, logvar = self.encode(x[i : i + batch_size])
            if sample:
                eps = torch.randn(mean.shape, generator=generator).to(mean.device)
                mean = reparameterize(mean, logvar, eps)
            out.append(mean * self.scale)
        return torch.cat(out)

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Scaled latents (what the diffusion model produces) → images (B, C, S, S) clamped to [−1, 1]."""
        return torch.cat([self.decode(z[i : i + batch_size] / self.scale).clamp(-1, 1)
                          for i in range(0, z.shape[0], batch_size)])


def vae_loss(vae: VAE, x: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{'loss', 'mse', 'kl'}: loss = (Σ (x − x̂)² + kl_weight · KL) / pixels, batch-averaged; kl in nats per image."""
    recon, mean, logvar = vae(x, noise)
    mse = F.mse_loss(recon, x)  # mean over pixels and batch
    kl = kl_divergence(mean, logvar).mean()
    loss = mse + vae.config.kl_weight * kl / x[0].numel()
    return {"loss": loss, "mse": mse, "kl": kl}


@torch.no_grad()
def compute_scale(vae: VAE, images: torch.Tensor, batch_size: int = 500) -> float:
    """Set and return vae.scale = 1 / std of the posterior means of `images` (the training set)."""
    vae.scale.fill_(1.0)
    z = vae.encode_latents(images, batch_size=batch_size)
    std = float(z.float().std())
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"latent std is {std}; cannot compute a scale (is the VAE trained?)")
    vae.scale.fill_(1.0 / std)
    return 1.0 / std


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB for images in [−1, 1] (peak-to-peak 2): 10·log10(4 / MSE), with the MSE over all pixels."""
    if x.shape != y.shape:
        raise ValueError(f"need two image batches of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    mse = F.mse_loss(x.float().clamp(-1, 1), y.float().clamp(-1, 1)).item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


@torch.no_grad()
def reconstruct(vae: VAE, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Deterministic reconstructions decode(mean(x)), clamped to [−1, 1]."""
    was = vae.training
    vae.eval()
    out = torch.cat([vae.decode(vae.encode(images[i : i + batch_size])[0]).clamp(-1, 1)
                     for i in range(0, images.shape[0], batch_size)])
    vae.train(was)
    return out


@torch.no_grad()
def evaluate_vae(vae: VAE, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    """Held-out reconstruction quality: mse, psnr (dB), KL rate (nats and bits per image), and, for MNIST with
    labels, the shipped classifier's accuracy on the reconstructions (vs on the originals)."""
    rec = reconstruct(vae, images)
    kl = torch.cat([kl_divergence(*vae.encode(images[i : i + 500])) for i in range(0, images.shape[0], 500)])
    c = vae.config
    out = {
        "mse": F.mse_loss(rec, images.clamp(-1, 1)).item(),
        "psnr": psnr(rec, images),
        "kl_nats": kl.mean().item(),
        "kl_bits": kl.mean().item() / math.log(2),
        "values_kept": c.values_kept,
        "pixels": c.in_channels * c.image_size**2,
        "n": int(images.shape[0]),
    }
    if labels is not None and (c.in_channels, c.image_size) == (1, 28):
        from minidit.metrics import accuracy, load_classifier

        clf = load_classifier()
        out["classifier_accuracy_reconstructed"] = accuracy(clf, rec, labels)
        out["classifier_accuracy_original"] = accuracy(clf, images, labels)
    return out


# ---- training ---------------------------------------------------------------------------------------------
def vae_dataset(name: str = "mnist", split: str = "train") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels or None): 'mnist' = the bundled digits (1×28×28); 'shapes' = captioned shapes (3×32×32)."""
    if name == "mnist":
        from minidit.data import mnist_tensors

        return mnist_tensors(split)
    if name == "shapes":
        from minidit.data import CaptionedShapes

        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        ds = CaptionedShapes(n=4000 if split == "train" else 500, seed=0 if split == "train" else 1)
        return torch.stack([ds[i]["image"] for i in range(len(ds))]), None
    raise ValueError(f"VAE dataset must be 'mnist' or 'shapes', got {name!r}")


def train_vae(
    config: VAEConfig,
    images: torch.Tensor,
    steps: int = 3000,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> tuple[VAE, dict]:
    """Train a VAE with AdamW (cosine decay to 5% of lr) on `images`, then set its scale; returns (vae, info)."""
    from tqdm.auto import tqdm

    if images.ndim != 4 or tuple(images.shape[1:]) != (config.in_channels, config.image_size, config.image_size):
        raise ValueError(f"images must be (N, {config.in_channels}, {config.image_size}, {config.image_size}), "
                         f"got {tuple(images.shape)}")
    if steps < 1 or not 1 <= batch_size <= images.shape[0]:
        raise ValueError(f"need steps ≥ 1 and 1 ≤ batch_size ≤ {images.shape[0]}, got {steps}, {batch_size}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae = VAE(config).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)  # linear warm-up over 5% of the steps, then cosine decay to 5% of lr

    def lr_factor(s: int) -> float:
        return (s + 1) / warm if s < warm else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    t0 = time.perf_counter()
    perm, pos = torch.randperm(images.shape[0], generator=g), 0
    for _ in tqdm(range(steps), desc="vae", disable=not progress, file=sys.stderr):
        if pos + batch_size > images.shape[0]:
            perm, pos = torch.randperm(images.shape[0], generator=g), 0
        x = images[perm[pos : pos + batch_size]]
        pos += batch_size
        losses = vae_loss(vae, x, torch.randn((x.shape[0], *config.latent_shape), generator=g))
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
    seconds = time.perf_counter() - t0
    vae.eval()
    scale = compute_scale(vae, images)
    with torch.no_grad():
        logvar = torch.cat([vae.encode(images[i : i + 500])[1] for i in range(0, images.shape[0], 500)])
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "train_seconds": round(seconds, 1),
            "train_images": int(images.shape[0]), "scale": scale,
            "posterior_std": float(logvar.mul(0.5).exp().mean()) * scale,  # in scaled-latent units
            "final_mse": losses["mse"].item(), "final_kl_nats": losses["kl"].item()}
    return vae, info


# ---- checkpoints ------------------------------------------------------------------------------------------
def save_vae(path: str | Path, vae: VAE, info: dict | None = None, half: bool = True) -> Path:
    """Weights (fp16 by default) + the scale buffer + config + info, as a minidit checkpoint of kind 'vae'."""
    state = {k: v.half() if half and v.is_floating_point() and k != "scale" else v for k, v in vae.state_dict().items()}
    return save_checkpoint(path, state, {"kind": "vae", "model": "VAE", "config": vae.config.to_dict(),
                                         "scale": float(vae.scale), **(info or {})})


def weights_path(name: str) -> Path:
    """Path of a VAE shipped with the package, e.g. weights_path('vae_mnist_f4c4')."""
    return Path(str(importlib.resources.files("minidit") / "weights" / f"{name}.safetensors"))


def load_vae(path: str | Path, device: torch.device | str = "cpu") -> VAE:
    """A VAE from a checkpoint (a path, or the name of a shipped one such as 'vae_mnist_f4c4'), fp32, eval mode."""
    p = Path(path)
    if not p.suffix and not p.exists():
        p = weights_path(str(path))
    tensors, meta = load_checkpoint(p, kind="vae")
    vae = VAE(VAEConfig.from_dict(meta["config"]))
    load_state(vae, {k: v.float() for k, v in tensors.items()}, what=f"VAE ({p})")
    return vae.to(device).eval().requires_grad_(False)


# ---- latent diffusion helpers ---------------------------------------------------------------------------------
def latent_dit_config(vae_config: VAEConfig, patch_size: int = 1, **overrides):
    """A DiTConfig whose input is this VAE's latent grid (input_size = S'/f, in_channels = latent channels)."""
    from minidit.models import DiTConfig

    return DiTConfig(input_size=vae_config.latent_size, in_channels=vae_config.latent_channels,
                     patch_size=patch_size, **overrides)


@torch.no_grad()
def sample_images(model: nn.Module, vae: VAE, labels: torch.Tensor, objective: str = "flow", **kwargs) -> torch.Tensor:
    """Sample scaled latents with a latent DiT (rectified flow via minidit.flow.sample, or 'ddpm' via
    minidit.ddpm.ddpm_sample with a `schedule` kwarg), then decode to images clamped to [−1, 1]."""
    if (model.config.in_channels, model.config.input_size) != vae.config.latent_shape[:2]:
        raise ValueError(f"model input (C, H) = ({model.config.in_channels}, {model.config.input_size}) does not match "
                         f"the VAE's latent grid {vae.config.latent_shape}")
    if objective == "flow":
        from minidit.flow import sample

        z = sample(model, labels, **kwargs)
    elif objective == "ddpm":
        from minidit.ddpm import ddpm_sample

        if "schedule" not in kwargs:
            raise ValueError("objective='ddpm' needs schedule=DDPMSchedule(...)")
        z = ddpm_sample(model, kwargs.pop("schedule"), labels, clip_x0=False, **kwargs)  # latents are not in [−1, 1]
    else:
        raise ValueError(f"objective must be 'flow' or 'ddpm', got {objective!r}")
    return vae.decode_latents(z.to(vae.scale.device))


# ---- command line -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minidit.vae", description="train / evaluate the course's VAEs")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a VAE on the bundled MNIST digits (or captioned shapes) and save it")
    t.add_argument("--dataset", default="mnist", choices=["mnist", "shapes"])
    t.add_argument("--factor", type=int, default=4, choices=[2, 4, 8])
    t.add_argument("--latent-channels", type=int, default=4)
    t.add_argument("--base-channels", type=int, default=16)
    t.add_argument("--max-channels", type=int, default=64)
    t.add_argument("--kl-weight", type=float, default=1e-3)
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--out", required=True, help="FILE.safetensors (fp16 weights + scale; FILE.json beside it)")
    e = sub.add_parser("evaluate", help="held-out PSNR / MSE / KL rate / classifier accuracy of a VAE checkpoint")
    e.add_argument("checkpoint", help="path or shipped name, e.g. vae_mnist_f4c4")
    e.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "evaluate":
        vae = load_vae(args.checkpoint)
        x, y = vae_dataset("mnist" if vae.config.in_channels == 1 else "shapes", "test")
        m = evaluate_vae(vae, x, y)
        print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()))
        return 0
    size, pad = (28, 2) if args.dataset == "mnist" else (32, 0)
    cfg = VAEConfig(in_channels=1 if args.dataset == "mnist" else 3, image_size=size, pad=pad, factor=args.factor,
                    latent_channels=args.latent_channels, base_channels=args.base_channels,
                    max_channels=args.max_channels, kl_weight=args.kl_weight)
    x, _ = vae_dataset(args.dataset, "train")
    vae, info = train_vae(cfg, x, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    xt, yt = vae_dataset(args.dataset, "test")
    held = evaluate_vae(vae, xt, yt)
    info.update({"dataset": args.dataset, "held_out": {k: round(v, 4) if isinstance(v, float) else v
                                                      for k, v in held.items()},
                 "command": command_line("python -m minidit.vae", argv)})
    save_vae(args.out, vae, info)
    print(f"{vae.num_params():,} parameters, {info['train_seconds']:.0f} s; held-out PSNR {held['psnr']:.2f} dB, "
          f"KL {held['kl_bits']:.0f} bits/image, scale {info['scale']:.4f} → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
