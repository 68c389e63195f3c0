"""Training throughput on this machine: images/s, model FLOP/s and MFU, and minidit against diffusers side by side.

    python benchmarks/throughput.py --json benchmarks/results/throughput.json     # ≈ 8 min on 2 cores
    python benchmarks/throughput.py --quick                                        # ≈ 2 min, smaller batches

What is timed: one forward + backward of a mean-squared loss in training mode (`fwd_bwd`), in fp32 and under
bf16 autocast, for the flagship recipe's model (`minidit.pipeline.RECIPES["flagship"].model`, read at run time;
now `mnist-p7`: MNIST patch 7 → 16 tokens, at the recipe's batch) and the course configs at 49, 196 and 256 tokens:
`mnist-s4` (patch 4), `mnist-s2` (patch 2) and DiT-S/2 on a 32×32×4 latent (velocity output). Every minidit model
runs on the CPU fast path the recipes train with (`pipeline.build_model`: `variants.speed.use_fast_attention`).
Beside it, the package's whole training step (`minidit.train.Trainer.train_step`: label dropout, forward, backward,
grad clipping, AdamW, EMA) for the flagship, alternated with forward + backward alone so that their ratio is the
step's overhead.

FLOPs per image use DiT's accounting (`minidit.variants.cost.train_flops_per_image` = 3 × forward matmul FLOPs);
MFU = achieved model FLOP/s ÷ the fp32 / bf16 matmul peak (`variants.speed.matmul_peak`) measured in this process,
before and after the runs (the larger is used). With more than one thread, the flagship's fp32 forward + backward
is also timed on 1 thread, alternated, each against the matmul peak of its own thread count: where the MFU is lost.

Peers: diffusers' `DiTTransformer2DModel` and `SD3Transformer2DModel`, built from configs identical to minidit's
`DiT` and `MMDiT` (nothing downloaded), are timed in alternating rounds (A B, B A, A B, …) so that load from other
processes hits both alike; the ratio is diffusers' median time ÷ minidit's (> 1: minidit is faster), with the
median and range of the per-round ratios beside it (their spread is this machine's noise).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import replace

import torch

from minidit.mmdit import MMDiT, MMDiTConfig
from minidit.models import DiTConfig, get_config
from minidit.pipeline import RECIPES, build_model
from minidit.runinfo import command_line, machine, save_result
from minidit.train import Trainer
from minidit.variants.cost import train_flops_per_image
from minidit.variants.speed import matmul_peak, mfu, time_alternating, use_fast_attention

TEXT_LEN = 16  # text tokens for the MMDiT / SD3 comparison
TEXT_DIM = 64  # width of the text token states and of the pooled vector


def course_configs(quick: bool) -> list[tuple[str, DiTConfig, int]]:
    """(name, DiT config, batch): the flagship recipe's model, then the course configs at 49, 196 and 256 tokens."""
    flagship = RECIPES["flagship"]
    return [
        ("flagship", flagship.model, 32 if quick else flagship.train.batch_size),
        ("mnist-s4", get_config("mnist-s4"), 16 if quick else 64),
        ("mnist-s2", get_config("mnist-s2"), 16 if quick else 64),
        ("DiT-S/2", get_config("DiT-S/2"), 2 if quick else 8),
    ]


def mmdit_twin(c: DiTConfig) -> MMDiTConfig:
    """An MMDiT with the DiT's image side (size, channels, patch, width, depth, heads), QK-RMSNorm as in SD3.5."""
    return MMDiTConfig(input_size=c.input_size, in_channels=c.in_channels, patch_size=c.patch_size, dim=c.dim,
                       depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, context_dim=TEXT_DIM,
                       pooled_dim=TEXT_DIM, qk_norm=True)


def diffusers_dit(c: DiTConfig):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=c.num_heads, attention_head_dim=c.dim // c.num_heads,
                                 in_channels=c.in_channels, out_channels=c.in_channels, num_layers=c.depth,
                                 sample_size=c.input_size, patch_size=c.patch_size,
                                 num_embeds_ada_norm=c.num_classes, norm_eps=1e-6)


def diffusers_sd3(c: MMDiTConfig):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=c.input_size, patch_size=c.patch_size, in_channels=c.in_channels,
                                 num_layers=c.depth, attention_head_dim=c.dim // c.num_heads,
                                 num_attention_heads=c.num_heads, joint_attention_dim=c.context_dim,
                                 caption_projection_dim=c.dim, pooled_projection_dim=c.pooled_dim,
                                 out_channels=c.in_channels, pos_embed_max_size=c.input_size // c.patch_size,
                                 qk_norm="rms_norm" if c.qk_norm else None)


def fwd_bwd_fns(kind: str, c: DiTConfig, batch: int, peers: bool = True) -> dict[str, Callable[[], None]]:
    """{'minidit': step, 'diffusers': step}: one forward + backward each, same inputs, training mode.

    With peers=False only minidit's (diffusers is not imported)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=g)
    t = torch.rand(batch, generator=g)
    if kind == "DiT":
        y = torch.randint(0, c.num_classes, (batch,), generator=g)
        ours = build_model(RECIPES["flagship"], c).train()  # any config, on the recipes' CPU fast path
        ref = diffusers_dit(c).train() if peers else None

        def run_ours():
            ours(x, t, y).square().mean().backward()
            ours.zero_grad(set_to_none=True)

        def run_ref():
            ref(x, t * 1000, y).sample.square().mean().backward()  # diffusers takes the timestep itself
            ref.zero_grad(set_to_none=True)
    else:
        mc = mmdit_twin(c)
        ctx, pooled = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g), torch.randn(batch, TEXT_DIM, generator=g)
        ours, ref = use_fast_attention(MMDiT(mc)).train(), diffusers_sd3(mc).train() if peers else None

        def run_ours():
            ours(x, t, pooled, ctx).square().mean().backward()
            ours.zero_grad(set_to_none=True)

        def run_ref():
            ref(x, ctx, pooled, t * 1000).sample.square().mean().backward()
            ref.zero_grad(set_to_none=True)
    return {"minidit": run_ours, "diffusers": run_ref} if peers else {"minidit": run_ours}


def alternate(fns: dict[str, Callable[[], None]], rounds: int, calls: int, bf16: bool) -> dict[str, list[float]]:
    """Seconds per call of each function in alternating rounds (variants.speed.time_alternating), under autocast."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return time_alternating(fns, rounds, calls)


def train_step_fn(c: DiTConfig, batch: int, bf16: bool) -> Callable[[], None]:
    """The package's own training step on random images (data, AdamW, grad clipping and EMA included)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2 * batch, c.in_channels, c.input_size, c.input_size, generator=g)
    labels = torch.randint(0, c.num_classes, (2 * batch,), generator=g)
    cfg = RECIPES["flagship"].train

    trainer = Trainer(build_model(RECIPES["flagship"], c), images, labels,
                      replace(cfg, batch_size=batch, bf16=bf16, steps=10**9))
    return trainer.train_step


def thread_scaling(c: DiTConfig, batch: int, threads: int, rounds: int, peak_s: float) -> dict:
    """fp32 forward + backward of `c` on 1 thread and on `threads`, alternated, each against its own matmul peak.

    Where MFU falls as threads are added, the step's small and elementwise operations scale worse than the
    matmul peak does (fixed per-operation costs and memory-bound passes do not halve with two threads)."""
    step = fwd_bwd_fns("DiT", c, batch, peers=False)["minidit"]

    def on(n: int) -> Callable[[], None]:
        def run():
            torch.set_num_threads(n)
            step()
        return run

    counts = (1, threads)
    times = time_alternating({n: on(n) for n in counts}, rounds, 2)
    peaks = {}
    for n in counts:
        torch.set_num_threads(n)
        peaks[n] = matmul_peak(torch.float32, seconds=peak_s)
    torch.set_num_threads(threads)
    flops = train_flops_per_image(c)
    med = {n: statistics.median(times[n]) for n in counts}
    res = {str(n): {"seconds_per_step": round(med[n], 5), "fp32_peak_gflops": round(peaks[n] / 1e9, 1),
                    "mfu_vs_this_thread_count_peak": round(mfu(batch / med[n], flops, peaks[n]), 4)}
           for n in counts}
    res["step_speedup"] = round(med[1] / med[threads], 3)
    res["peak_speedup"] = round(peaks[threads] / peaks[1], 3)
    return res


def row(name, kind, impl, c, batch, dtype, secs, flops, peaks) -> dict:
    med = statistics.median(secs)
    ips = batch / med
    return {
        "config": name, "model": kind, "impl": impl, "tokens": c.num_tokens, "batch": batch, "dtype": dtype,
        "images_per_s": round(ips, 2), "seconds_per_step": round(med, 5), "train_gflops_per_image": flops / 1e9,
        "model_gflops_per_s": round(ips * flops / 1e9, 2),
        "mfu_vs_fp32_peak": round(mfu(ips, flops, peaks["float32"]), 4),
        "mfu_vs_bf16_peak": round(mfu(ips, flops, peaks["bfloat16"]), 4),
        "mfu_vs_own_peak": round(mfu(ips, flops, peaks["bfloat16" if dtype == "bf16" else "float32"]), 4),
        "samples": [round(s, 5) for s in secs],
    }


def measure_peaks(seconds: float) -> dict[str, float]:
    return {"float32": matmul_peak(torch.float32, seconds=seconds),
            "bfloat16": matmul_peak(torch.bfloat16, seconds=seconds)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="small batches, fewer rounds (a smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds per comparison")
    ap.add_argument("--only", choices=["flagship", "mnist-s4", "mnist-s2", "DiT-S/2"], action="append",
                    help="restrict to these configs (repeatable)")
    ap.add_argument("--no-peers", action="store_true", help="skip the diffusers comparison")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error("--threads must be ≥ 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rounds = args.rounds or (2 if args.quick else 6)
    peak_s = 0.3 if args.quick else 1.0
    info = machine()
    print(f"threads {info['threads']}, load average {info['load_average_1min']}, torch {info['torch']}", flush=True)

    peaks_before = measure_peaks(peak_s)
    print("(MFU in the lines below is against the peak measured before the runs; the summary at the end and the "
          "JSON use the better of the peaks measured before and after)", flush=True)
    rows, ratios = [], []
    configs = [cfg for cfg in course_configs(args.quick) if not args.only or cfg[0] in args.only]
    for name, c, batch in configs:
        for kind in ("DiT", "MMDiT"):
            flops = train_flops_per_image(c if kind == "DiT" else mmdit_twin(c), TEXT_LEN)
            for bf16 in (False, True):
                dtype = "bf16" if bf16 else "fp32"
                fns = fwd_bwd_fns(kind, c, batch, peers=not args.no_peers)
                calls = 1 if c.num_tokens > 200 else 2
                times = alternate(fns, rounds, calls, bf16)
                for impl, secs in times.items():
                    rows.append(row(name, kind, impl, c, batch, dtype, secs, flops, peaks_before))
                    r = rows[-1]
                    print(f"{name:9s} {kind:5s} {impl:9s} {dtype} T={c.num_tokens:3d} B={batch:3d}: "
                          f"{r['images_per_s']:8.1f} img/s  {r['model_gflops_per_s']:7.1f} GFLOP/s  "
                          f"MFU {100 * r['mfu_vs_own_peak']:5.1f}% of {dtype} peak "
                          f"({100 * r['mfu_vs_fp32_peak']:5.1f}% of fp32 peak)", flush=True)
                if "diffusers" in times:
                    ratio = statistics.median(times["diffusers"]) / statistics.median(times["minidit"])
                    per_round = [d / m for d, m in zip(times["diffusers"], times["minidit"])]
                    paired = statistics.median(per_round)
                    ratios.append({"config": name, "model": kind, "peer": "diffusers " + (
                        "DiTTransformer2DModel" if kind == "DiT" else "SD3Transformer2DModel"),
                        "dtype": dtype, "tokens": c.num_tokens, "speedup_vs_diffusers": round(ratio, 3),
                        "paired_median_speedup": round(paired, 3),
                        "paired_range": [round(min(per_round), 3), round(max(per_round), 3)]})
                    print(f"    minidit {kind} is {ratio:.2f}× diffusers ({dtype}, paired rounds {paired:.2f}×, "
                          f"from {min(per_round):.2f}× to {max(per_round):.2f}×)", flush=True)
        if name == "flagship":  # the package's whole training step, alternated with the bare forward + backward
            for bf16 in (False, True):
                dtype = "bf16" if bf16 else "fp32"
                fns = {"train_step": train_step_fn(c, batch, bf16),
                       "fwd_bwd": fwd_bwd_fns("DiT", c, batch, peers=False)["minidit"]}
                times = alternate(fns, rounds, 2, bf16)
                rows.append(row(name, "DiT", "Trainer.train_step", c, batch, dtype, times["train_step"],
                                train_flops_per_image(c), peaks_before))
                r = rows[-1]
                r["seconds_vs_fwd_bwd_same_rounds"] = round(
                    statistics.median(times["train_step"]) / statistics.median(times["fwd_bwd"]), 3)
                print(f"{name:9s} Trainer.train_step {dtype}: {r['images_per_s']:8.1f} img/s, "
                      f"MFU {100 * r['mfu_vs_own_peak']:5.1f}% of {dtype} peak "
                      f"({100 * r['mfu_vs_fp32_peak']:5.1f}% of fp32 peak); "
                      f"{r['seconds_vs_fwd_bwd_same_rounds']:.2f}× the time of forward + backward alone", flush=True)
    scaling = None
    flagship = [(c, batch) for name, c, batch in configs if name == "flagship"]
    if args.threads > 1 and flagship:
        c, batch = flagship[0]
        scaling = thread_scaling(c, batch, args.threads, rounds, peak_s)
        one, many = scaling["1"], scaling[str(args.threads)]
        print(f"flagship DiT fp32 forward + backward: 1 thread {100 * one['mfu_vs_this_thread_count_peak']:.1f}% of "
              f"the 1-thread fp32 peak, {args.threads} threads {100 * many['mfu_vs_this_thread_count_peak']:.1f}% "
              f"of the {args.threads}-thread peak; the step runs {scaling['step_speedup']:.2f}× faster on "
              f"{args.threads} threads where the matmul peak grows {scaling['peak_speedup']:.2f}×", flush=True)
    peaks_after = measure_peaks(peak_s)
    peaks = {k: max(peaks_before[k], peaks_after[k]) for k in peaks_before}
    for r in rows:  # MFU against the better of the two peak measurements (a conservative denominator)
        ips, flops = r["images_per_s"], r["train_gflops_per_image"] * 1e9
        r["mfu_vs_fp32_peak"] = round(mfu(ips, flops, peaks["float32"]), 4)
        r["mfu_vs_bf16_peak"] = round(mfu(ips, flops, peaks["bfloat16"]), 4)
        r["mfu_vs_own_peak"] = r["mfu_vs_bf16_peak"] if r["dtype"] == "bf16" else r["mfu_vs_fp32_peak"]
    print(f"matmul peak (best of before/after): fp32 {peaks['float32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s")
    flag = [r for r in rows if r["config"] == "flagship" and r["impl"] in ("minidit", "Trainer.train_step")
            and r["model"] == "DiT"]
    best = max(flag, key=lambda r: r["mfu_vs_fp32_peak"]) if flag else None
    for r in flag:
        print(f"flagship {r['impl']} {r['dtype']}: {r['images_per_s']:.1f} img/s = "
              f"{100 * r['mfu_vs_fp32_peak']:.1f}% of the fp32 matmul peak")
    if best:
        print(f"flagship best: {best['impl']} {best['dtype']} {best['images_per_s']:.1f} img/s = "
              f"{100 * best['mfu_vs_fp32_peak']:.1f}% of the fp32 matmul peak (goal ≥ 60%)")
    if ratios:
        print("minidit ÷ diffusers speed: " + ", ".join(
            f"{r['model']} {r['config']} {r['dtype']} {r['speedup_vs_diffusers']:.2f}×" for r in ratios))
    result = {
        "command": command_line("python benchmarks/throughput.py", argv), "machine": info,
        "peak_gflops": {"before": {k: v / 1e9 for k, v in peaks_before.items()},
                        "after": {k: v / 1e9 for k, v in peaks_after.items()}},
        "rows": rows, "ratios_vs_diffusers": ratios,
        "flagship_best": best,
        "flagship_fp32_thread_scaling": scaling,
    }
    save_result(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
