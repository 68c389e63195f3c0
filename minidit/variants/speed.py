"""Speed engineering beside the teaching path: CPU fast paths, and the tools that measure time, memory and MFU.

The fast path: attention without the fused kernel for short sequences, where that is faster on a CPU.

PyTorch's fused `scaled_dot_product_attention` pays off for long sequences; for the course's CPU models (16–49
tokens) plain matmul → softmax → matmul was faster, forward + backward (2-core CPU, benchmarks/attention_kernels.py:
bf16 1.7–3.8× up to 196 keys, 1.45–1.6× at 512; fp32 1.2–1.3× at 16 keys, parity from 32 to 64). PyTorch's bf16
CPU softmax is slow on rows shorter than its vector width, so rows under 32 keys take their softmax in fp32 (the
same forward values; gradients rounded once). A model opts in with `use_fast_attention(model)`; the maths is the
same as minidit.attention's, only the kernels differ. Unfused, autograd keeps each head's (T × T) weights for
backward (`dit_activation_bytes` counts them).

The measuring tools: an activation-memory model of DiT training (`dit_activation_bytes`, `dit_training_peak_bytes`),
the peak memory of a call from the profiler's allocation events (`peak_memory_bytes`), a matmul peak and model
FLOPs utilisation (`matmul_peak`, `mfu`), and interleaved timing for side-by-side comparisons (`time_alternating`).
"""

from __future__ import annotations

import math
import os
import time
import types
from collections.abc import Callable, Iterable

import torch
from torch import nn

from minidit.attention import AttentionModule
from minidit.models import DiTConfig
from minidit.variants.cost import FREQUENCY_DIM

CPU_UNFUSED_MAX_KEYS = {torch.float32: 64, torch.bfloat16: 512}  # up to this many keys, unfused was as fast or faster
FP32_SOFTMAX_BELOW_KEYS = 32


def runs_unfused(device: torch.device | str, dtype: torch.dtype, keys: int) -> bool:
    """True where the fast path trains with matmul → softmax → matmul rather than SDPA: on a CPU, short sequences."""
    return torch.device(device).type == "cpu" and keys <= CPU_UNFUSED_MAX_KEYS.get(dtype, 0)


def unfused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
    """softmax(q·kᵀ/√d)·v in q's dtype (fp32 softmax for rows shorter than FP32_SOFTMAX_BELOW_KEYS): (B, H, Tq, d)."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~(mask[:, None, None, :] if mask.ndim == 2 else mask), float("-inf"))
    short = k.shape[2] < FP32_SOFTMAX_BELOW_KEYS
    return scores.softmax(dim=-1, dtype=torch.float32 if short else None).to(q.dtype) @ v


def fast_attend(self: AttentionModule, q, k, v, mask=None, return_weights: bool = False):
    """`AttentionModule.attend`, unfused where `runs_unfused` says it is faster (weights and recording unchanged)."""
    if return_weights or self.recorder is not None or not runs_unfused(q.device, q.dtype, k.shape[2]):
        return AttentionModule.attend(self, q, k, v, mask, return_weights)
    return unfused_attention(q, k, v, mask), None


def use_fast_attention(model: nn.Module) -> nn.Module:
    """Put every attention layer of `model` on the CPU fast path (in place; returns the model)."""
    for m in model.modules():
        if isinstance(m, AttentionModule):
            m.attend = types.MethodType(fast_attend, m)
    return model


# ---- activation memory --------------------------------------------------------------------------------------
def _block_bytes(config: DiTConfig, batch: int, bf16: bool, device: torch.device | str = "cpu") -> tuple[int, int]:
    """(bytes one adaLN-Zero block saves for backward, bytes of its weight gradients)."""
    c = config
    D, T, H, r = c.dim, c.num_tokens, c.num_heads, c.mlp_ratio
    hidden = int(D * r)
    weights = 4 * D * D + 2 * D * hidden  # qkv, out-proj, fc1, fc2 (biases and adaLN counted below)
    act = 2 if bf16 else 4  # bytes per saved activation value: the residual stream is bf16 under autocast too
    unfused = runs_unfused(device, torch.bfloat16 if bf16 else torch.float32, T)
    fp32_softmax = bf16 and T < FP32_SOFTMAX_BELOW_KEYS  # short bf16 rows also keep their fp32 softmax output
    per_head = (act + 4 * fp32_softmax) * T if unfused else 4  # the (T × T) softmax weights per head, or SDPA's LSE
    saved = (act * (12 + 2 * r) * D + per_head * H) * T * batch
    if bf16:
        saved += 2 * (weights + 6 * D * D)  # the bf16 copies of the weights that the matmuls save (adaLN's too)
    params = weights + 6 * D * D + 13 * D + 2 * hidden  # + adaLN (D → 6D) and biases
    return int(saved), 4 * params


def _outside_bytes(c: DiTConfig, batch: int, bf16: bool) -> int:
    """What the layers outside the blocks save: ≈ 3 vectors of width D per token (the tokens and the final layer's
    norm/modulation), and under bf16 the bf16 copies of their weights (patch conv, t-MLP, final adaLN and Linear)."""
    pixels = c.patch_size**2
    weights = pixels * c.in_channels * c.dim + FREQUENCY_DIM * c.dim + 3 * c.dim**2 + c.dim * pixels * c.in_channels
    return 3 * (2 if bf16 else 4) * c.dim * c.num_tokens * batch + (2 * weights if bf16 else 0)


def dit_activation_bytes(config: DiTConfig, batch: int = 1, bf16: bool = False,
                         grad_checkpointing: bool = False, device: torch.device | str = "cpu") -> int:
    """Bytes autograd holds for backward at the end of a DiT's forward pass (adaLN-Zero blocks, on the fast path).

    Per token and block, counted from what each op saves (checked with `saved_tensor_bytes` in tests/test_speed.py):
      fp32: 12 + 2·r vectors of width D (r = mlp_ratio): the two LayerNorm inputs and outputs (4), the qkv and fc1
            inputs (2), q, k, v (3), the attention output (1) and out-projection output (1), fc1 output and GELU
            output (2·r), fc2 output (1); SDPA keeps only a log-sum-exp per head, no T×T matrix.
      bf16 autocast: all 12 + 2·r in bf16 (half the bytes: the residual stream keeps the patch embedding's bf16),
            plus the bf16 copies of the block's weights.
      On the fast path on a CPU, short sequences (fp32 ≤ 64 tokens, bf16 ≤ 512, `runs_unfused`) run attention
            unfused, which keeps each head's T×T weights instead of SDPA's log-sum-exp (under bf16 below 32 tokens
            both the fp32 softmax output and its bf16 copy, `FP32_SOFTMAX_BELOW_KEYS`).
    Outside the blocks ≈ 3·D per token (`_outside_bytes`). With gradient checkpointing each block keeps only its
    input (one vector per token) until backward recomputes it.
    """
    if not isinstance(config, DiTConfig):
        raise TypeError(f"expected a DiTConfig, got {type(config).__name__}")
    if batch < 1:
        raise ValueError(f"batch must be ≥ 1, got {batch}")
    c = config
    outside = _outside_bytes(c, batch, bf16)
    if grad_checkpointing:
        return int(outside + c.depth * (2 if bf16 else 4) * c.dim * c.num_tokens * batch)
    return int(outside + c.depth * _block_bytes(c, batch, bf16, device)[0])


def dit_training_peak_bytes(config: DiTConfig, batch: int = 1, bf16: bool = False,
                            grad_checkpointing: bool = False, device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated during one forward + backward beyond the weights (no optimizer state).

    Backward walks the blocks from last to first: after i blocks, (L − i) blocks' saved activations are still
    alive and i blocks' weight gradients exist, so the peak is the larger end, max(activations, gradients),
    plus the full activations of one recomputed block with checkpointing, plus the largest temporary (the MLP's
    hidden gradient, B·T·hidden values).
    """
    c = config
    saved, grads = _block_bytes(c, batch, bf16, device)
    keep = saved if not grad_checkpointing else (2 if bf16 else 4) * c.dim * c.num_tokens * batch
    outside = _outside_bytes(c, batch, bf16)
    recompute = saved if grad_checkpointing else 0
    temporary = (2 if bf16 else 4) * int(c.dim * c.mlp_ratio) * c.num_tokens * batch
    live = max((c.depth - i) * keep + i * grads for i in range(c.depth + 1))
    return int(outside + live + recompute + temporary)


# ---- utilisation --------------------------------------------------------------------------------------------
def matmul_peak(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", n: int | None = None,
                seconds: float = 1.0, repeats: int = 3) -> float:
    """The best FLOP/s of n×n×n matrix products in `dtype` on `device` (the denominator of MFU).

    Best of `repeats` windows of ≈ `seconds` each (a shared machine can only make a window slower).
    n defaults to 1024 on CPU and 8192 on GPU.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up
    sync()
    best = 0.0
    for _ in range(repeats):
        count, start = 0, time.perf_counter()
        while True:
            a @ b
            count += 1
            if count % 4 == 0 or device.type != "cuda":
                sync()
                elapsed = time.perf_counter() - start
                if elapsed >= seconds:
                    break
        best = max(best, 2 * n**3 * count / elapsed)
    return best


def mfu(images_per_second: float, flops_per_image: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s (images/s × FLOPs per image) ÷ the peak FLOP/s."""
    if images_per_second < 0 or flops_per_image <= 0 or peak_flops <= 0 or not math.isfinite(images_per_second):
        raise ValueError(f"need images/s ≥ 0 and FLOPs per image, peak > 0; got {images_per_second}, "
                         f"{flops_per_image}, {peak_flops}")
    return images_per_second * flops_per_image / peak_flops


# ---- measuring memory on any device (the check of the model above) -----------------------------------------------
def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by `fn()` above what was allocated before it, from torch.profiler's memory events.

    The profiler records every allocation and free of PyTorch's CPU (and CUDA) allocator; the running sum of those
    events is the live memory and its maximum the peak. (Process RSS is no measure: glibc keeps freed pages and
    reuses them, so it reports the high-water mark of everything the process ever did.)
    """
    from torch.profiler import ProfilerActivity, profile

    # Kineto, the profiler's engine, logs each start/stop (and a failed GPU probe on CPU-only machines) to stderr,
    # which a notebook shows; its levels run 0-5, so 6 silences it unless the user chose a level.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `fn()` runs (e.g. a forward pass).

    Counted by storage through `torch.autograd.graph.saved_tensors_hooks`, so a tensor saved by several ops counts
    once; storages of `exclude` (pass the model's parameters) are left out.
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    return sum(n for ptr, n in storages.items() if ptr not in skip)


def time_alternating(fns: dict[str, Callable[[], object]], rounds: int = 3, calls: int = 1,
                     device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Seconds per call of each function, timed in alternating rounds (A B C, C B A, A B C, …) after one untimed
    warm-up call each: on a shared machine, load from other processes then hits every contender alike.
    Compare medians (or per-round ratios), not single times."""
    if not fns or rounds < 1 or calls < 1:
        raise ValueError(f"need ≥ 1 function, round and call; got {len(fns)}, {rounds}, {calls}")
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:
        fns[n]()
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fns[n]()
            sync()
            times[n].append((time.perf_counter() - start) / calls)
    return times
