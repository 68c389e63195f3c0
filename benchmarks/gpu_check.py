"""One prepared check for a CUDA machine: the device tests, then DiT-S/2 training throughput and MFU.

    python benchmarks/gpu_check.py --json gpu_check.json     # ≤ 8 minutes on one H100 / H200
    python benchmarks/gpu_check.py --quick                   # ≈ 2–3 minutes: fewer tests, fewer steps

1. `pytest -m cuda tests/test_device.py`: model, training step, sampling, bf16 autocast and torch.compile on the
   GPU against the CPU; DDP over NCCL when the machine has ≥ 2 GPUs (skipped otherwise).
2. The bf16 matmul peak of this GPU, measured here (`minidit.variants.speed.matmul_peak`, 8192³ products).
3. DiT-S/2 on 32×32×4 latents (256 tokens, velocity output), bf16 autocast + torch.compile, timed two ways on
   random latents:
   - `package`: the package's own `minidit.train.Trainer.train_step` (batch indexing, t/noise/label-dropout draws,
     flow loss, backward, grad clipping, AdamW, EMA, the loss read back every step);
   - `bare`: the same compiled model, loss, AdamW and EMA with the noise drawn on the GPU and no per-step read-back:
     what the model itself can do, so the difference is the training loop's overhead.
   images/s and MFU = images/s × training FLOPs per image (DiT's accounting, `variants.cost`) ÷ the measured peak;
   on an H100 SXM / H200 also ÷ the datasheet's dense bf16 peak (989 TFLOP/s), which a sustained 8192³ product
   does not reach, so that figure is the lower, stricter one.
   `--sdpa flash|efficient|cudnn|math` pins PyTorch's attention kernel for both runs (default: PyTorch's choice);
   `--compile-mode reduce-overhead` replays each step as CUDA graphs, `max-autotune` also tunes the kernels
   (a longer compilation: give it its own call).

On a machine without CUDA it prints why and exits 0, touching nothing. Needs torch, safetensors, tqdm, pytest
(not mlxtend or diffusers): the device tests use synthetic data.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from minidit.flow import flow_loss, sample_t
from minidit.guidance import drop_labels
from minidit.models import DiT, DiTConfig, get_config
from minidit.runinfo import command_line, machine, save_result
from minidit.train import COMPILE_MODES, TrainConfig, Trainer
from minidit.variants.cost import train_flops_per_image
from minidit.variants.speed import matmul_peak, mfu, use_fast_attention

ROOT = Path(__file__).resolve().parents[1]
SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
DATASHEET_BF16_TFLOPS = {"NVIDIA H200": 989.4, "NVIDIA H100 80GB HBM3": 989.4}  # dense (no sparsity), SXM boards
NO_CUDA = ("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False): nothing was run. "
           "Run this script on a machine with an NVIDIA GPU and a CUDA build of PyTorch.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="fewer device tests and timed steps (≈ 2–3 minutes)")
    ap.add_argument("--config", default="DiT-S/2", help="model config to time (default DiT-S/2)")
    ap.add_argument("--batch", type=int, default=256, help="images per training step")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 50, quick 20)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (compilation; default 5, quick 3)")
    ap.add_argument("--no-compile", action="store_true", help="time eager mode instead of torch.compile")
    ap.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                    help="torch.compile's mode (reduce-overhead: CUDA graphs; max-autotune: also kernel tuning)")
    ap.add_argument("--skip-tests", action="store_true", help="only the throughput part")
    ap.add_argument("--sdpa", choices=sorted(SDPA), help="pin the attention kernel (default: PyTorch's choice)")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # tests run the timing code on the CPU
    args = ap.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (20 if args.quick else 50)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.quick else 5)
    if args.batch < 1 or args.steps < 1 or args.warmup < 1:
        ap.error(f"--batch, --steps and --warmup must be ≥ 1, got {args.batch}, {args.steps}, {args.warmup}")
    try:
        get_config(args.config)
    except ValueError as e:
        ap.error(str(e))
    return args


def throughput_summary(batch: int, steps: int, seconds: float, flops_per_image: float, peak_flops: float) -> dict:
    """images/s, achieved model TFLOP/s and MFU for `steps` steps of `batch` images in `seconds`."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    ips = batch * steps / seconds
    return {"images_per_s": round(ips, 1), "model_tflops_per_s": round(ips * flops_per_image / 1e12, 2),
            "mfu": round(mfu(ips, flops_per_image, peak_flops), 4), "step_ms": round(1000 * seconds / steps, 2)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - start


def build(config: DiTConfig, device: torch.device) -> DiT:
    """The DiT as the recipes build it (`minidit.pipeline.build_model`): on a CPU, the fast attention path."""
    return use_fast_attention(DiT(config)) if device.type == "cpu" else DiT(config)


def random_latents(config: DiTConfig, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, config.in_channels, config.input_size, config.input_size, generator=g)
    return x.to(device), torch.randint(0, config.num_classes, (n,), generator=g).to(device)


def package_step_seconds(config: DiTConfig, batch: int, steps: int, warmup: int, device: torch.device,
                         compile: bool, compile_mode: str = "default") -> float:
    """Seconds for `steps` calls of the package's Trainer.train_step (bf16 autocast, optionally compiled)."""
    x, y = random_latents(config, 4 * batch, device)
    cfg = TrainConfig(steps=10**9, batch_size=batch, lr=1e-4, ema_decay=0.9999, bf16=True, compile=compile,
                      compile_mode=compile_mode)
    torch.manual_seed(0)
    trainer = Trainer(build(config, device), x, y, cfg, device=device)
    return _timed(trainer.train_step, steps, warmup, device)


def bare_step_seconds(config: DiTConfig, batch: int, steps: int, warmup: int, device: torch.device,
                      compile: bool, compile_mode: str = "default") -> float:
    """The same model, loss and optimizer with everything on the device and no per-step host synchronisation."""
    torch.manual_seed(0)
    model = build(config, device).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    net = torch.compile(model, mode=compile_mode) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
    x, y = random_latents(config, batch, device)
    params, ema_params = list(model.parameters()), list(ema.parameters())

    def step():
        t = sample_t(batch, device=device)
        noise = torch.randn_like(x)
        y_in = drop_labels(y, torch.rand(batch, device=device) < 0.1, model.null_label)  # CFG's label dropout
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = flow_loss(net, x, y_in, t, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        torch._foreach_lerp_(ema_params, params, 1 - 0.9999)

    return _timed(step, steps, warmup, device)


def run_device_tests(quick: bool, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_device.py"]
    if quick:
        cmd += ["-k", "not compiled and not nccl"]
    start = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out, code = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        out, code = f"{e.stdout or ''}\n[timed out after {timeout} s]", -1
    tail = out.strip().splitlines()[-1] if out.strip() else ""
    print(out[-3000:], flush=True)
    return {"command": " ".join(["python", *cmd[1:]]), "returncode": code, "summary": tail,  # no machine paths
            "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA, flush=True)
        save_result(args.json, {"skipped": True, "reason": NO_CUDA})
        return 0
    t_start = time.perf_counter()
    result: dict = {"command": command_line("python benchmarks/gpu_check.py", argv), "machine": machine(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        result["device"] = {"name": props.name, "count": torch.cuda.device_count(),
                            "memory_gib": round(props.total_memory / 2**30, 1),
                            "capability": f"{props.major}.{props.minor}"}
        print(f"device: {props.name} × {torch.cuda.device_count()}, torch {torch.__version__}", flush=True)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if not args.skip_tests:
        result["device_tests"] = run_device_tests(args.quick, timeout=150 if args.quick else 240)

    config = get_config(args.config)
    flops = train_flops_per_image(config)
    peak = matmul_peak(torch.bfloat16, device, seconds=1.0 if args.quick else 2.0)
    result["bf16_matmul_peak_tflops"] = round(peak / 1e12, 1)
    print(f"bf16 matmul peak: {peak / 1e12:.0f} TFLOP/s", flush=True)
    datasheet = DATASHEET_BF16_TFLOPS.get(result.get("device", {}).get("name"))
    compile = not args.no_compile
    runs = {}
    for name, fn in (("package", package_step_seconds), ("bare", bare_step_seconds)):
        with sdpa_kernel(SDPA[args.sdpa]) if args.sdpa else nullcontext():
            seconds = fn(config, args.batch, args.steps, args.warmup, device, compile, args.compile_mode)
        runs[name] = throughput_summary(args.batch, args.steps, seconds, flops, peak)
        vs_sheet = ""
        if datasheet:
            runs[name]["mfu_vs_datasheet"] = round(mfu(runs[name]["images_per_s"], flops, datasheet * 1e12), 4)
            vs_sheet = f" ({100 * runs[name]['mfu_vs_datasheet']:.1f}% of the datasheet's {datasheet:.0f})"
        mode = f" ({args.compile_mode})" if args.compile_mode != "default" else ""
        print(f"{args.config} {name:7s} bf16{' + compile' + mode if compile else ''}, batch {args.batch}: "
              f"{runs[name]['images_per_s']:.0f} img/s, {runs[name]['model_tflops_per_s']:.0f} TFLOP/s, "
              f"MFU {100 * runs[name]['mfu']:.1f}% of the measured peak{vs_sheet}", flush=True)
    result["throughput"] = {"config": args.config, "tokens": config.num_tokens, "batch": args.batch,
                            "train_gflops_per_image": flops / 1e9, "compile": compile,
                            "compile_mode": args.compile_mode if compile else None, "bf16": True,
                            "sdpa": args.sdpa or "default", "datasheet_bf16_tflops": datasheet,
                            "steps": args.steps, "warmup": args.warmup, **runs}
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    tests_ok = args.skip_tests or result["device_tests"]["returncode"] == 0
    verdict = "skipped" if args.skip_tests else "passed" if tests_ok else "FAILED"
    print(f"device tests: {verdict}; total {result['seconds']:.0f} s", flush=True)
    save_result(args.json, result)
    return 0 if tests_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
