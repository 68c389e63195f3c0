"""High resolution: what each way up in resolution costs from 32 to 256 pixels, and what it reaches at 64×64 after the
same training budget, on compositional scenes ("a small red circle left of a large blue square", "three large green
triangles").

Methods (minidit.variants.hires; same width, depth, heads and text encoder):
  dit        single stage at the target resolution, full attention (patch 4: 256 tokens at 64 px)
  window     single stage, attention within 4×4-token tiles + 16 pooled global tokens
  cascade    a base DiT at half the resolution + a super-resolution stage (tiles + global tokens, no text) given the
             upsampled low-resolution image, noise-augmented in training (U(0, 0.5)) and at sampling (--aug)
  hourglass  fine tokens (tiles + pooled 2×2 summaries) → merge 2×2 → coarse DiT blocks (global attention, text) →
             split + skip → fine tokens attending to their tile and to the coarse tokens (cross-resolution attention)
Rows (method × resolution): analytic forward FLOPs per image (`hires_flops`; the cascade = base + SR stage), the
measured training step time and peak memory at --batch images (32–128 px; 256 px analytic only) and, at 64 px, the
quality after the same budget: caption faithfulness per check (minidit.variants.scenes.scene_faithfulness: colour,
shape, size, relation, count, all) and the Fréchet distance of scene features (palette classes per cell) to real
renders, beside the real-vs-real floor at the same N. Then SD3's resolution shift at sampling (shift √(64²/32²) = 2
and 3 against 1) for the single-stage and hourglass models.

Training budget: the CPU seconds each method's training steps use (--clock cpu, default) or wall-clock seconds
(--clock wall). CPU time is what a method costs on a shared machine (on a quiet one, with 1 thread, it equals
wall-clock); the methods train in alternating chunks, so load from other processes hits them alike either way.
Settings: trained on scenes of seed 0, CFG scale and SR augmentation level fixed beforehand (--cfg, --aug);
evaluated on N captions of seed 2 (never trained on as images), floor = N training renders vs the N test renders.

    python benchmarks/hires.py --quick --json /tmp/hires_quick.json            # smoke run: tiny models, ≈ 3 min
    python benchmarks/hires.py --json benchmarks/results/hires.json --plot benchmarks/results/hires.png \\
        --save-weights minidit/weights                                        # ≈ 75 min alone on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F

from minidit.checkpoint import save_model
from minidit.metrics import frechet_distance
from minidit.runinfo import command_line, machine, save_result
from minidit.sampling import sample
from minidit.train import TrainConfig, Trainer
from minidit.variants.hires import (
    HiresConfig,
    HiresT2I,
    SuperRes,
    SuperResTrainer,
    hires_flops,
    upsample,
)
from minidit.variants.scenes import scene_faithfulness, scene_features, scenes_tensors
from minidit.variants.speed import peak_memory_bytes, time_alternating, use_fast_attention

METHODS = ("dit", "window", "cascade", "hourglass")
FULL = dict(model=dict(dim=128, depth=4, num_heads=4, fine_dim=64, text_dim=64), sr=dict(dim=64, depth=2),
            n_train=8000, budget=900.0, chunk=60.0, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.995,
            n=200, n_shift=100, steps=20, cost_sizes=(32, 64, 128, 256), measure_sizes=(32, 64, 128))
QUICK = dict(model=dict(dim=32, depth=1, num_heads=2, fine_dim=16, text_dim=16, text_depth=1, text_heads=2),
             sr=dict(dim=32, depth=1, num_heads=2), n_train=128, budget=6.0, chunk=2.0, batch_size=16, lr=1e-3,
             warmup_steps=5, ema_decay=0.9, n=16, n_shift=8, steps=4, cost_sizes=(32, 64, 128, 256),
             measure_sizes=(32, 64))
BASE_SHARE = 0.7  # the cascade's budget: 70 % for the base model, 30 % for the SR stage


def configs(s: dict, size: int) -> dict[str, list[HiresConfig]]:
    """The models of each method at image size `size` (the cascade: base at size/2, SR stage at size)."""
    m, low = s["model"], size // 2
    sr = {**m, **s["sr"]}
    return {"dit": [HiresConfig(arch="dit", input_size=size, **m)],
            "window": [HiresConfig(arch="window", input_size=size, **m)],
            "cascade": [HiresConfig(arch="dit", input_size=low, **m),
                        HiresConfig(arch="sr", input_size=size, low_size=low, **sr)],
            "hourglass": [HiresConfig(arch="hourglass", input_size=size, **m)]}


def build(c: HiresConfig) -> torch.nn.Module:
    return use_fast_attention(SuperRes(c) if c.arch == "sr" else HiresT2I(c))


def trainers(s: dict, size: int, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict[str, Trainer]:
    """One Trainer per model (the cascade has two: `cascade` = its base on x/2, `cascade-sr`)."""
    cfg = TrainConfig(steps=10**9, batch_size=s["batch_size"], lr=s["lr"], warmup_steps=s["warmup_steps"],
                      ema_decay=s["ema_decay"], seed=seed, extra={"n_images": int(x.shape[0])})
    out = {}
    for method, cs in configs(s, size).items():
        for c in cs:
            torch.manual_seed(seed)
            if c.arch == "sr":
                out[f"{method}-sr"] = SuperResTrainer(build(c), x, cfg)
            else:
                out[method] = Trainer(build(c), x if c.input_size == size else F.avg_pool2d(x, size // c.input_size),
                                      y, cfg)
    return out


# ---- cost ----------------------------------------------------------------------------------------------------
def cost_rows(s: dict, batch: int, threads: int) -> list[dict]:
    rows = []
    for size in s["cost_sizes"]:
        cs = configs(s, size)
        flops = {k: sum(hires_flops(c) for c in v) for k, v in cs.items()}
        tokens = {k: (v[-1].input_size // v[-1].patch_size) ** 2 for k, v in cs.items()}
        steps, peaks = {}, {}
        if size in s["measure_sizes"]:
            g = torch.Generator().manual_seed(0)
            x = torch.rand(batch * 2, 3, size, size, generator=g) * 2 - 1
            y = torch.randint(0, 4000, (batch * 2,), generator=g)
            small = {**s, "batch_size": batch}
            tr = trainers(small, size, x, y, seed=0)
            fns = {k: tr[k].train_step for k in tr}
            times = {k: statistics.median(v) for k, v in time_alternating(fns, rounds=3).items()}
            steps = {"dit": times["dit"], "window": times["window"], "hourglass": times["hourglass"],
                     "cascade": times["cascade"] + times["cascade-sr"]}
            mem = {k: peak_memory_bytes(fn) for k, fn in fns.items()}
            peaks = {"dit": mem["dit"], "window": mem["window"], "hourglass": mem["hourglass"],
                     "cascade": max(mem["cascade"], mem["cascade-sr"])}  # the stages train one after the other
        for k in METHODS:
            rows.append({"method": k, "resolution": size, "tokens": tokens[k], "flops": flops[k],
                         "flops_vs_dit": round(flops[k] / flops["dit"], 4),
                         "step_seconds": round(steps[k], 4) if steps else None,
                         "step_vs_dit": round(steps[k] / steps["dit"], 3) if steps else None,
                         "peak_bytes": peaks.get(k), "batch": batch if steps else None, "threads": threads})
            measured = f"  step {steps[k] * 1e3:7.0f} ms (×{steps[k] / steps['dit']:.2f})  peak " \
                       f"{peaks[k] / 2**20:6.0f} MB" if steps else ""
            print(f"  {size:4d} px {k:10s} {tokens[k]:5d} tokens  {flops[k] / 1e9:8.3f} GFLOPs/image "
                  f"(×{flops[k] / flops['dit']:.2f}){measured}", flush=True)
    return rows


# ---- quality after the same budget --------------------------------------------------------------------------
def train_all(trs: dict[str, Trainer], budgets: dict[str, float], chunk: float, clock) -> dict[str, float]:
    """Alternate between the trainers, `chunk` seconds of training at a time, until each has spent its budget."""
    used = dict.fromkeys(trs, 0.0)
    while any(used[k] < budgets[k] for k in trs):
        for k, tr in trs.items():
            target = min(budgets[k], used[k] + chunk)
            while used[k] < target:
                start = clock()
                tr.train_step()
                used[k] += clock() - start
        print("  " + ", ".join(f"{k} {tr.step} steps ({used[k]:.0f} s)" for k, tr in trs.items()), flush=True)
    return used


@torch.no_grad()
def generate(trs: dict[str, Trainer], method: str, ids: torch.Tensor, s: dict, cfg: float, shift: float, aug: float,
             seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Samples (N, 3, 64, 64) of a method (and the cascade's base samples at 32) for caption ids."""
    g = torch.Generator().manual_seed(seed)
    x = sample(trs[method].ema, ids, steps=s["steps"], cfg_scale=cfg, shift=shift, generator=g, batch_size=50)
    if method != "cascade":
        return x.clamp(-1, 1), None
    low = x.clamp(-1, 1)
    return upsample(trs["cascade-sr"].ema, low, steps=s["steps"], aug=aug, seed=seed), low


def score(images: torch.Tensor, scenes: list, real_feats: torch.Tensor, floor: float) -> dict:
    fd = frechet_distance(scene_features(images), real_feats)
    return {**{k: round(v, 4) for k, v in scene_faithfulness(images, scenes).items()}, "fid": round(fd, 5),
            "fid_floor": round(floor, 5), "fid_ratio": round(fd / floor, 3)}


def plot(result: dict, path: str, samples: dict[str, torch.Tensor]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minidit.viz import image_grid, save_figure

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for k in METHODS:
        rows = [r for r in result["cost"] if r["method"] == k]
        axes[0].loglog([r["resolution"] for r in rows], [r["flops"] / 1e9 for r in rows], "o-", label=k)
        meas = [r for r in rows if r["step_seconds"]]
        axes[1].loglog([r["resolution"] for r in meas], [r["step_seconds"] for r in meas], "o-", label=k)
    for ax, title in zip(axes[:2], ("analytic forward GFLOPs per image", f"measured training step (s), batch "
                                    f"{result['cost'][0]['batch']}")):
        ax.set(xlabel="image side (pixels)", title=title)
        ax.set_xticks(result["settings"]["cost_sizes"], [str(r) for r in result["settings"]["cost_sizes"]])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    grid = image_grid(torch.cat([samples[k][:8] for k in METHODS]), nrow=8)
    axes[2].imshow(grid.numpy())
    axes[2].set(title="64 px samples: " + ", ".join(METHODS) + " (rows)", xticks=[], yticks=[])
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, seconds of training, N = 16 (smoke run)")
    p.add_argument("--budget", type=float, help="training seconds per method (default 900; --quick 6)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--n", type=int, help="evaluation captions (default 200)")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--aug", type=float, default=0.1, help="the SR stage's noise augmentation at sampling")
    p.add_argument("--batch", type=int, default=8, help="batch of the measured step times and peak memory")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1: on a shared machine more threads only add contention")
    p.add_argument("--json")
    p.add_argument("--plot")
    p.add_argument("--save-weights", metavar="DIR", help="save each 64 px model's EMA (fp16) as hires_*.safetensors")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = dict(QUICK if args.quick else FULL)
    s.update({k: v for k, v in (("budget", args.budget), ("n", args.n)) if v is not None})
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    command = command_line("python benchmarks/hires.py", argv)
    t_start = time.perf_counter()
    result: dict = {"settings": {**s, "clock": args.clock, "cfg": args.cfg, "aug": args.aug, "seed": args.seed,
                                 "base_share": BASE_SHARE}, "command": command, "machine": machine("cpu")}
    if not args.skip_cost:
        print("cost: analytic FLOPs per image, measured training step and peak memory", flush=True)
        result["cost"] = cost_rows(s, args.batch, args.threads)

    size = 64
    t0 = time.perf_counter()
    x, y, _ = scenes_tensors(s["n_train"], seed=args.seed, size=size)
    x_test, y_test, test_scenes = scenes_tensors(s["n"], seed=args.seed + 2, size=size)
    real = scene_features(x[: s["n"]])
    floor = frechet_distance(real, scene_features(x_test))
    test_feats = scene_features(x_test)
    print(f"data: {s['n_train']} training scenes, {s['n']} test captions ({time.perf_counter() - t0:.0f} s); "
          f"feature floor {floor:.4f}", flush=True)
    trs = trainers(s, size, x, y, args.seed)
    budgets = {k: s["budget"] * (BASE_SHARE if k == "cascade" else 1 - BASE_SHARE if k == "cascade-sr" else 1.0)
               for k in trs}
    t0 = time.perf_counter()
    used = train_all(trs, budgets, s["chunk"], clock)
    result["training"] = {k: {"steps": tr.step, "budget_seconds": budgets[k], "clock_seconds": round(used[k], 1),
                              "train_wall_seconds": round(tr.train_seconds, 1),
                              "images_seen": tr.step * s["batch_size"], "final_loss": tr.history[-1]["loss"],
                              "parameters": sum(p.numel() for p in tr.ema.parameters())}
                          for k, tr in trs.items()}
    print(f"training done in {time.perf_counter() - t0:.0f} s wall", flush=True)

    quality, samples = [], {}
    flops64 = {r["method"]: r["flops"] for r in result.get("cost", []) if r["resolution"] == size}
    for k in METHODS:
        t0 = time.perf_counter()
        images, low = generate(trs, k, y_test, s, args.cfg, 1.0, args.aug, args.seed + 1)
        samples[k] = images
        row = {"method": k, "resolution": size, "flops": flops64.get(k), "cfg": args.cfg, "shift": 1.0,
               "train_steps": trs[k].step, **score(images, test_scenes, test_feats, floor)}
        row["sample_seconds"] = round(time.perf_counter() - t0, 1)
        quality.append(row)
        print(f"  {k:10s} {row}", flush=True)
        if low is not None:  # the cascade's base, judged at its own resolution against renders at 32 px
            x32 = F.avg_pool2d(x_test, 2)
            base = {"method": "cascade-base", "resolution": size // 2, "cfg": args.cfg, "shift": 1.0,
                    **score(low, test_scenes, scene_features(x32), frechet_distance(scene_features(F.avg_pool2d(
                        x[: s["n"]], 2)), scene_features(x32)))}
            quality.append(base)
            print(f"  {'base@32':10s} {base}", flush=True)
    result["quality"] = quality

    print("SD3's resolution shift at sampling (alpha = sqrt(64²/32²) = 2, and 3)", flush=True)
    shifts = []
    n = s["n_shift"]
    floor_n = frechet_distance(scene_features(x[:n]), scene_features(x_test[:n]))
    for k in ("dit", "hourglass"):
        for shift in (1.0, 2.0, 3.0):
            images, _ = generate(trs, k, y_test[:n], s, args.cfg, shift, args.aug, args.seed + 1)
            row = {"method": k, "shift": shift, "n": n, **score(images, test_scenes[:n], scene_features(x_test[:n]),
                                                                  floor_n)}
            shifts.append(row)
            print(f"  {k:10s} shift {shift:.0f}: all {row['all']:.3f}, fid {row['fid']:.4f}", flush=True)
    result["shift"] = shifts
    result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    if args.save_weights:
        for k, tr in trs.items():
            name = {"cascade": "hires_base32", "cascade-sr": "hires_sr64"}.get(k, f"hires_{k}64")
            save_model(f"{args.save_weights}/{name}.safetensors", tr.ema, half=True, step=tr.step,
                       train=asdict(tr.cfg), training=result["training"][k], command=command,
                       machine=machine("cpu"))
    save_result(args.json, result)
    if args.plot:
        plot(result, args.plot, samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
