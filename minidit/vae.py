"""A small convolutional VAE: images ↔ latents, the reparameterisation trick, KL, and the latent scale factor.

encoder(x) → (mean, log-variance) per latent value → z = mean + σ·ε (reparameterised) → decoder(z) ≈ x.
Loss per image = Σ (x − x̂)² + kl_weight · KL(q(z|x) ‖ N(0, I)), divided by the number of pixels (so the
reconstruction term is the usual per-pixel MSE). kl_weight plays the role of 2σ² of a Gaussian decoder.

Shapes: the latent grid is (latent_channels, S/f, S/f) for an S×S input and downsampling factor f ∈ {2, 4, 8}.
MNIST digits are 28×28, which f = 8 does not divide: the VAE pads them with `pad` = 2 background pixels
(value −1) on every side to 32×32 before encoding and crops the decoder's 32×32 output back to 28×28.
So f = 2, 4, 8 give 16×16, 8×8, 4×4 latent grids for a 28×28 digit.

Latents for a diffusion model are z = scale · mean(x), with scale = 1 / std of those latents over the training
set, computed once after training and stored in the checkpoint — the role 0.18215 plays for Stable
Diffusion's VAE. We encode the posterior *mean* (not a sample): with the small KL weights used here the posterior
standard deviation is small next to the spread of the means (`info['posterior_std']` records it).

Train and ship (the shipped weights' JSON records the exact command and the measured held-out PSNR):
    minidit vae train --factor 4 --latent-channels 4 --out minidit/weights/vae_mnist_f4c4.safetensors
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minidit.checkpoint import build_config, load_checkpoint, load_state, save_checkpoint, weights_path
from minidit.metrics import accuracy, load_classifier
from minidit.models import describe


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


# ---- the three ingredients: reparameterisation, KL, scale ----------------------------------------------------
def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """z = μ + σ·ε with σ = exp(½·log σ²) and ε ~ N(0, I): a sample whose gradient flows into μ and log σ²."""
    noise = torch.randn_like(mean) if noise is None else noise
    return mean + torch.exp(0.5 * logvar) * noise


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) = ½ Σ (μ² + σ² − 1 − log σ²), summed over all but the batch dim → (B,) in nats."""
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

    @staticmethod
    def check(x: torch.Tensor, want: tuple[int, ...], what: str) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"the VAE's {what} are (B, {', '.join(map(str, want))}), got {describe(x)}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, S, S) → posterior mean and log-variance, each (B, c, S'/f, S'/f) with S' = S + 2·pad."""
        self.check(x, (self.config.in_channels, self.config.image_size, self.config.image_size), "images")
        p = self.config.pad
        x = F.pad(x, (p, p, p, p), value=self.config.pad_value)  # (B, C, S', S')
        mean, logvar = self.encoder(x).chunk(2, dim=1)  # each (B, c, S'/f, S'/f)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, c, S'/f, S'/f) → images (B, C, S, S) (the padding border cropped off, not clamped)."""
        self.check(z, self.config.latent_shape, "latents")
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


def vae_loss(vae: VAE, x: torch.Tensor, noise: torch.Tensor | None = None, kl_weight: float | None = None
             ) -> dict[str, torch.Tensor]:
    """{'loss', 'mse', 'kl'}: loss = (Σ (x − x̂)² + kl_weight · KL) / pixels, batch-averaged; kl in nats per image.

    kl_weight defaults to the VAE's own (pass it when `vae` is wrapped, e.g. by DDP)."""
    recon, mean, logvar = vae(x, noise)
    mse = F.mse_loss(recon, x)  # mean over pixels and batch
    kl = kl_divergence(mean, logvar).mean()
    loss = mse + (vae.config.kl_weight if kl_weight is None else kl_weight) * kl / x[0].numel()
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
        clf = load_classifier()
        out["classifier_accuracy_reconstructed"] = accuracy(clf, rec, labels)
        out["classifier_accuracy_original"] = accuracy(clf, images, labels)
    return out


# ---- checkpoints ------------------------------------------------------------------------------------------
def save_vae(path: str | Path, vae: VAE, info: dict | None = None, half: bool = True) -> Path:
    """Weights (fp16 by default) + the scale buffer + config + info, as a minidit checkpoint of kind 'vae'."""
    state = {k: v.half() if half and v.is_floating_point() and k != "scale" else v for k, v in vae.state_dict().items()}
    return save_checkpoint(path, state, {"kind": "vae", "model": "VAE", "config": vae.config.to_dict(),
                                         "scale": float(vae.scale), **(info or {})})


def load_vae(path: str | Path, device: torch.device | str = "cpu") -> VAE:
    """A VAE from a checkpoint (a path, or the name of a shipped one such as 'vae_mnist_f4c4'), fp32, eval mode."""
    p = Path(path) if Path(path).suffix or Path(path).exists() else weights_path(str(path))
    tensors, meta = load_checkpoint(p, kind="vae")
    vae = VAE(build_config(VAEConfig, meta["config"]))
    load_state(vae, tensors, what=f"VAE ({p})")
    return vae.to(device).eval().requires_grad_(False)
