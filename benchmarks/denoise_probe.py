"""Why DDPM's ε-prediction learns the class slower than rectified flow: a one-step denoising probe.

Loads the models saved by `nfe_sweep.py --save-models DIR` (one per objective), noises held-out digits to the
same signal-to-noise ratios, SNR = ᾱ/(1 − ᾱ) for DDPM and (1 − t)²/t² for rectified flow, and asks each model
for its one-step estimate of the clean image x̂0 (DDPM ε-model: (x_k − √(1 − ᾱ)·ε̂)/√ᾱ; DDPM v-model:
√ᾱ·x_k − √(1 − ᾱ)·v̂; RF: x_t − t·v̂). Per noise level:

  accuracy      the package's classifier on x̂0 given the TRUE label (does the estimate show the right digit?)
  follows_label x̂0 given a WRONG label (y + 3 mod 10) lies nearest (L2) to that label's mean training digit
                among the 10 class means (does the label steer the estimate? chance = 0.1). At high noise the
                best estimate IS about the class mean, a blur the classifier was never trained on.
  x0_mse        mean squared error of x̂0 (given the true label) against the clean digit
  loss_weight   the weight each training loss puts on x̂0's squared error at this noise level:
                ε-loss ‖ε̂ − ε‖² = SNR·‖x̂0 − x0‖²;  DDPM v-loss ‖v̂ − v‖² = (SNR + 1)·‖x̂0 − x0‖²;
                RF velocity loss ‖v̂ − v‖² = ‖x̂0 − x0‖²/t² = (1 + √SNR)²·‖x̂0 − x0‖²;  with min-SNR-γ: min(SNR, γ)

and per model, with training times drawn as in its training run (DDPM: uniform k; RF: its t distribution), the
share of training draws at √SNR < 1 (where the image is more noise than signal and the class gets decided)
and the share of the training LOSS those draws carry: what the gradient is mostly about.

    python benchmarks/denoise_probe.py --models DIR [--n 1000] [--json OUT]
    python benchmarks/denoise_probe.py --models benchmarks/results/nfe_full_models    # the full sweep's models, ≈ 80 s
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from minidit.checkpoint import load_model, read_meta
from minidit.data import mnist_tensors
from minidit.ddpm import DDPMSchedule, eps_and_x0, q_sample, v_target
from minidit.flow import interpolate, sample_t
from minidit.metrics import accuracy, load_classifier
from minidit.runinfo import command_line, machine, save_result

SQRT_SNR = [2.0, 1.0, 0.6, 0.4, 0.25]  # √SNR: 2 = mostly signal … 0.25 = mostly noise


@torch.no_grad()
def x0_estimate(model, train: dict, x0: torch.Tensor, noise: torch.Tensor, y: torch.Tensor, s: float):
    """One-step x̂0 from a copy of x0 noised to √SNR = s, and the loss weight on x̂0's error at that level."""
    n = x0.shape[0]
    if train["objective"] == "flow":
        t = 1 / (1 + s)  # (1 − t)/t = s
        x_t = interpolate(x0, noise, torch.full((n,), t))
        return x_t - t * model(x_t, torch.full((n,), t), y), (1 + s) ** 2
    sched = DDPMSchedule(train["ddpm_schedule"])
    k = int((sched.alphas_cumprod - s**2 / (1 + s**2)).abs().argmin())  # the integer step nearest that SNR
    abar = sched.alphas_cumprod[k].item()
    kk = torch.full((n,), k)
    x_k = q_sample(sched, x0, kk, noise)
    prediction, gamma = train.get("ddpm_prediction", "eps"), train.get("min_snr_gamma")
    _, x0_hat = eps_and_x0(x_k, model(x_k, sched.model_time(kk), y), abar, prediction)
    snr = abar / (1 - abar)
    return x0_hat, (min(snr, gamma) if gamma is not None else snr if prediction == "eps" else snr + 1)


@torch.no_grad()
def high_noise_shares(model, train: dict, x0: torch.Tensor, y: torch.Tensor, repeats: int = 4,
                      seed: int = 0) -> tuple[float, float]:
    """(share of training draws, share of training loss) at √SNR < 1, times drawn as the model was trained."""
    g = torch.Generator().manual_seed(seed)
    x0, y = x0.repeat(repeats, 1, 1, 1), y.repeat(repeats)  # (R·N, C, H, W), (R·N,) with their true labels
    n = x0.shape[0]
    noise = torch.randn(x0.shape, generator=g)
    if train["objective"] == "flow":
        t = sample_t(n, train["t_sampling"], train["t_mean"], train["t_std"], train["t_shift"], generator=g)
        x_t = interpolate(x0, noise, t)
        loss = (model(x_t, t, y) - (noise - x0)).pow(2).flatten(1).mean(1)  # (n,) v-loss per draw
        sqrt_snr = (1 - t) / t
    else:
        sched = DDPMSchedule(train["ddpm_schedule"])
        k = torch.randint(0, sched.T, (n,), generator=g)
        prediction, gamma = train.get("ddpm_prediction", "eps"), train.get("min_snr_gamma")
        target = noise if prediction == "eps" else v_target(x0, noise, sched.abar(k, x0))
        out = model(q_sample(sched, x0, k, noise), sched.model_time(k), y)
        loss = (out - target).pow(2).flatten(1).mean(1)  # (n,) ε- or v-loss per draw
        abar = sched.alphas_cumprod[k]
        snr = abar / (1 - abar)
        if gamma is not None:  # min-SNR-γ weights, as in training
            loss = loss * (snr.clamp(max=gamma) / (snr if prediction == "eps" else snr + 1)).float()
        sqrt_snr = snr.sqrt().float()
    high = sqrt_snr < 1
    return high.float().mean().item(), (loss[high].sum() / loss.sum()).item()


def nearest_mean(images: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Index (N,) of the class-mean digit (10, H·W) nearest each image (N, 1, H, W) in L2."""
    return torch.cdist(images.flatten(1).float(), means).argmin(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="folder with nfe_*.safetensors from nfe_sweep.py --save-models")
    p.add_argument("--n", type=int, default=1000, help="held-out digits (at most 1,000)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the table here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = sorted(Path(args.models).glob("nfe_*.safetensors"))
    if not paths:
        raise SystemExit(f"no nfe_*.safetensors in {args.models}: run nfe_sweep.py --save-models {args.models}")
    x, y = mnist_tensors("test")
    if not 10 <= args.n <= x.shape[0]:
        raise SystemExit(f"--n must be in [10, {x.shape[0]}], got {args.n}")
    x, y = x[: args.n], y[: args.n]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    wrong = (y + 3) % 10
    xt, yt = mnist_tensors("train")
    means = torch.stack([xt[yt == c].mean(0) for c in range(10)]).flatten(1)  # (10, 784) class-mean digits
    clf = load_classifier()
    rows, shares = [], []
    for path in paths:
        model = load_model(path)  # fp32, eval mode
        train = read_meta(path)["train"]
        name = path.stem.removeprefix("nfe_")
        draws, loss_share = high_noise_shares(model, train, x, y)
        shares.append({"model": name, "objective": train["objective"], "draws_sqrt_snr_below_1": round(draws, 3),
                       "loss_share_sqrt_snr_below_1": round(loss_share, 4)})
        print(f"{name:11s} draws at √SNR < 1: {draws:.0%} of training draws carry {loss_share:.1%} of the loss",
              file=sys.stderr)
        for s in SQRT_SNR:
            x0_true, weight = x0_estimate(model, train, x, noise, y, s)
            x0_wrong, _ = x0_estimate(model, train, x, noise, wrong, s)
            rows.append({"model": name, "objective": train["objective"], "sqrt_snr": s,
                         "accuracy": round(accuracy(clf, x0_true.clamp(-1, 1), y), 3),
                         "follows_label": round(nearest_mean(x0_wrong, means).eq(wrong).float().mean().item(), 3),
                         "x0_mse": round(((x0_true - x).pow(2)).mean().item(), 4), "loss_weight": round(weight, 3)})
            r = rows[-1]
            print(f"{name:11s} √SNR {s:4.2f}: x̂0 accuracy {r['accuracy']:.2f}  follows a wrong label "
                  f"{r['follows_label']:.2f}  x̂0 MSE {r['x0_mse']:.3f}  loss weight on x̂0 error {weight:6.2f}",
                  file=sys.stderr)
    out = {"benchmark": "denoise_probe", "models": str(args.models), "n": args.n, "rows": rows,
           "high_noise_shares": shares,
           "command": command_line("python benchmarks/denoise_probe.py", argv), "machine": machine()}
    save_result(args.json, out)
    if not args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
