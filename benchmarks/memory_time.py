"""Memory against time: bf16 autocast, gradient checkpointing and torch.compile, measured with the package's own
training step (`minidit.train.Trainer.train_step`: forward, backward, grad clipping, AdamW, EMA).

    python benchmarks/memory_time.py --json benchmarks/results/memory_time.json    # ≈ 6 min on 2 cores
    python benchmarks/memory_time.py --quick                                      # no compile, 1 round

For the flagship recipe's model (`minidit.pipeline.RECIPES["flagship"]`, at its batch) and DiT-S/2 on 32×32×4
latents (256 tokens, batch 8), both on the CPU fast path the recipes train with (`pipeline.build_model`,
`variants.speed.use_fast_attention`): the four settings {fp32, bf16} × {checkpointing off, on} are timed in
alternating rounds (ratios to fp32 are what to read on a shared machine) and their peak memory during a step is
measured with torch.profiler's allocation events (`variants.speed.peak_memory_bytes`) beside the memory model's
prediction (`variants.speed.dit_training_peak_bytes`).
`torch.compile` (TrainConfig.compile) is timed for the flagship in fp32 and bf16: the first step (compilation)
and the steady state against eager, alternating.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from minidit.models import DiTConfig, get_config
from minidit.pipeline import RECIPES, build_model
from minidit.runinfo import command_line, machine, save_result
from minidit.train import Trainer
from minidit.variants.cost import train_flops_per_image
from minidit.variants.speed import dit_training_peak_bytes, peak_memory_bytes, time_alternating

SETTINGS = {
    "fp32": dict(bf16=False, grad_checkpointing=False),
    "bf16": dict(bf16=True, grad_checkpointing=False),
    "fp32+ckpt": dict(bf16=False, grad_checkpointing=True),
    "bf16+ckpt": dict(bf16=True, grad_checkpointing=True),
}


def make_trainer(c: DiTConfig, batch: int, **overrides) -> Trainer:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * batch, c.in_channels, c.input_size, c.input_size, generator=g)
    y = torch.randint(0, c.num_classes, (4 * batch,), generator=g)
    cfg = replace(RECIPES["flagship"].train, batch_size=batch, steps=10**9, time_budget=None, **overrides)
    torch.manual_seed(0)
    return Trainer(build_model(RECIPES["flagship"], c), x, y, cfg)  # c on the flagship recipe's (CPU fast) path


def settings_rows(name: str, c: DiTConfig, batch: int, rounds: int) -> list[dict]:
    trainers = {s: make_trainer(c, batch, **kw) for s, kw in SETTINGS.items()}
    times = time_alternating({s: tr.train_step for s, tr in trainers.items()}, rounds=rounds)
    base = statistics.median(times["fp32"])
    rows = []
    for s, tr in trainers.items():
        peak = peak_memory_bytes(tr.train_step)
        n_params = sum(p.numel() for p in tr.model.parameters())
        sec = statistics.median(times[s])
        rows.append({"config": name, "tokens": c.num_tokens, "batch": batch, "setting": s,
                     "seconds_per_step": round(sec, 4), "images_per_s": round(batch / sec, 1),
                     "time_vs_fp32": round(sec / base, 3),
                     "paired_time_vs_fp32": round(statistics.median(a / b for a, b in zip(times[s], times["fp32"])), 3),
                     "peak_step_mb": round(peak / 2**20, 1),
                     "predicted_peak_mb": round(dit_training_peak_bytes(c, batch, **SETTINGS[s]) / 2**20, 1),
                     "resident_mb": round(n_params * 4 * 4 / 2**20, 1),  # weights, EMA, AdamW's two moments
                     "samples": [round(t, 4) for t in times[s]]})
    fp32_peak = rows[0]["peak_step_mb"]
    for r in rows:
        r["peak_vs_fp32"] = round(r["peak_step_mb"] / fp32_peak, 3)
    return rows


def bench_configs(quick: bool) -> list[tuple[str, DiTConfig, int]]:
    """(name, config, batch): the flagship recipe's model at its batch and DiT-S/2 on latents (256 tokens)."""
    return [("flagship", RECIPES["flagship"].model, 32 if quick else RECIPES["flagship"].train.batch_size),
            ("DiT-S/2", get_config("DiT-S/2"), 2 if quick else 8)]


def compile_rows(c: DiTConfig, batch: int, rounds: int) -> list[dict]:
    rows = []
    for bf16 in (False, True):
        eager, compiled = make_trainer(c, batch, bf16=bf16), make_trainer(c, batch, bf16=bf16, compile=True)
        start = time.perf_counter()
        compiled.train_step()  # compilation happens here
        first = time.perf_counter() - start
        times = time_alternating({"eager": eager.train_step, "compiled": compiled.train_step}, rounds=rounds)
        e, k = statistics.median(times["eager"]), statistics.median(times["compiled"])
        rows.append({"dtype": "bf16" if bf16 else "fp32", "first_step_seconds": round(first, 1),
                     "eager_seconds_per_step": round(e, 4), "compiled_seconds_per_step": round(k, 4),
                     "speedup": round(e / k, 3),
                     "paired_speedup": round(statistics.median(a / b for a, b in zip(times["eager"],
                                                                                     times["compiled"])), 3),
                     "break_even_steps": round(first / max(e - k, 1e-9)) if e > k else None})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="smaller batches, one round, no torch.compile")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()
    rounds = 1 if args.quick else 4
    flagship = RECIPES["flagship"].model
    configs = bench_configs(args.quick)
    rows = []
    for name, c, batch in configs:
        rows += settings_rows(name, c, batch, rounds)
    for r in rows:
        print(f"{r['config']:8s} {r['setting']:10s} B={r['batch']:3d}: {r['images_per_s']:7.1f} img/s "
              f"(time ×{r['time_vs_fp32']:.2f} of fp32), peak {r['peak_step_mb']:7.1f} MB (×{r['peak_vs_fp32']:.2f}; "
              f"model {r['predicted_peak_mb']:.1f}) + {r['resident_mb']:.1f} MB weights/EMA/AdamW", flush=True)
    comp = []
    if not (args.quick or args.no_compile):
        comp = compile_rows(flagship, RECIPES["flagship"].train.batch_size, rounds)
        for r in comp:
            print(f"torch.compile flagship {r['dtype']}: first step {r['first_step_seconds']} s, steady "
                  f"{r['compiled_seconds_per_step']:.3f} s vs eager {r['eager_seconds_per_step']:.3f} s "
                  f"(×{r['speedup']:.2f}, break-even after {r['break_even_steps']} steps)", flush=True)
    result = {"command": command_line("python benchmarks/memory_time.py", argv), "machine": info,
              "train_gflops_per_image": {n: train_flops_per_image(c) / 1e9 for n, c, _ in configs},
              "memory_method": "torch.profiler profile_memory=True: running sum of allocation events, max over one "
                               "train_step after a warm-up step (AdamW state already allocated)",
              "settings": rows, "compile": comp}
    save_result(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
