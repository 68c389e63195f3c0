"""What a DiT costs: forward FLOPs per image with DiT's accounting (DESIGN §5).

FLOPs here are floating-point operations = 2 × multiply-adds (DiT's tables count multiply-adds: divide by 2).
Per image, with T tokens, L blocks, width D and MLP ratio 4:
    forward ≈ 2·T·(12·L·D²)   token-wise Linear layers (qkv 3D², out-proj D², MLP 8D²)
            + 4·L·T²·D        attention scores q·kᵀ and the weighted sum of values
            + per-image terms  timestep MLP and the adaLN regressions, which act once per image, not per token
            + patch embedding and the final Linear (2·T·p²·C·D each way).
Counting adaLN per token would overstate DiT-XL/2 by ~46%. Training costs ≈ 3 × forward (backward ≈ 2 × forward).
Only matrix products are counted (norms, activations and softmax are ignored, as in the papers).

Also here: the same accounting for SD3's MMDiT (`mmdit_flops`), an activation-memory model for training
(`dit_activation_bytes`), the cost of a DiT at any resolution / patch size / latent factor (`dit_cost_at`, the
figure of notebook 12), and model FLOPs utilisation against a matmul peak measured in the same process
(`matmul_peak`, `mfu`). benchmarks/cost_model.py checks the model against measured step time and peak memory.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

import torch

from minidit.attention import FP32_SOFTMAX_BELOW_KEYS, runs_unfused
from minidit.mmdit import MMDiTConfig
from minidit.models import DiTConfig

FREQUENCY_DIM = 256  # the timestep embedder's sinusoidal features (minidit.embed)
ADALN_OUTPUTS = {"adaln-zero": 6, "adaln": 4, "cross-attention": 0, "in-context": 0}  # × D per block


def dit_flops_breakdown(config: DiTConfig, context_len: int = 0) -> dict[str, int]:
    """Forward FLOPs per image of a DiT, term by term (see the module docstring).

    `context_len` is the text length L_ctx for a config with `context_dim` (text cross-attention in every block).
    """
    if not isinstance(config, DiTConfig):
        raise TypeError(f"expected a DiTConfig, got {type(config).__name__}")
    if config.context_dim is not None and context_len < 1:
        raise ValueError(f"config has text cross-attention (context_dim={config.context_dim}): pass context_len ≥ 1")
    c = config
    D, L, T = c.dim, c.depth, c.num_tokens
    hidden = int(D * c.mlp_ratio)
    Tb = T + 2 if c.conditioning == "in-context" else T  # tokens inside the blocks
    variant = c.attn or {}
    kv_dim = variant.get("n_kv_heads", c.num_heads) * (D // c.num_heads)  # grouped-query attention: fewer k/v
    keys = Tb  # keys seen by each query: all tokens, or its window plus the global tokens
    if variant.get("window"):
        keys = variant["window"] ** 2 + variant.get("global_tokens", 0)
    terms = {
        "patch_embed": 2 * T * (c.patch_size**2 * c.in_channels) * D,
        # qkv + out-proj + MLP = 12·D² for ratio 4 (qkv is (D + 2·kv_dim)·D with grouped-query attention)
        "block_linears": 2 * Tb * L * ((2 * D + 2 * kv_dim) * D + 2 * D * hidden),
        "attention": 4 * L * Tb * keys * D,  # q·kᵀ and weights·v, each T·keys·D multiply-adds
        "timestep_mlp": 2 * (FREQUENCY_DIM * D + D * D),
        "adaln": 2 * L * D * ADALN_OUTPUTS[c.conditioning] * D,  # once per image
        "final_adaln": 2 * D * 2 * D if c.conditioning in ("adaln-zero", "adaln") else 0,
        "final_linear": 2 * T * D * (c.patch_size**2 * c.out_channels),
    }
    if c.conditioning == "cross-attention":  # 2 condition tokens [t_emb, y_emb] of width D as keys/values
        terms["cross_attention"] = L * (2 * T * 2 * D * D + 2 * 2 * 2 * D * D + 4 * T * 2 * D)
    if c.context_dim is not None:  # text cross-attention inside DiTBlock (q, kv from context, out-proj, attention)
        terms["text_cross_attention"] = L * (2 * T * 2 * D * D + 2 * context_len * c.context_dim * 2 * D
                                             + 4 * T * context_len * D)
    return terms


def dit_flops(config: DiTConfig, context_len: int = 0) -> int:
    """Forward FLOPs per image (2 × multiply-adds); training ≈ 3 × this per image."""
    return sum(dit_flops_breakdown(config, context_len).values())


def train_flops_per_image(config: DiTConfig | MMDiTConfig, context_len: int = 0) -> int:
    """Training FLOPs per image ≈ 3 × forward (backward costs two forwards: grads of inputs and of weights)."""
    fwd = mmdit_flops(config, context_len) if isinstance(config, MMDiTConfig) else dit_flops(config, context_len)
    return 3 * fwd


# ---- SD3's MMDiT ----------------------------------------------------------------------------------------------
def mmdit_flops_breakdown(config: MMDiTConfig, context_len: int, image_size: int | None = None) -> dict[str, int]:
    """Forward FLOPs per image of an MMDiT with `context_len` text tokens (DiT's accounting, per stream).

    Every block: image and text Linears (12·D² per token each), one joint attention over T + L tokens, two
    adaLN regressions per image. The last block is pre-only: its text stream computes only k, v (and q).
    """
    if not isinstance(config, MMDiTConfig):
        raise TypeError(f"expected an MMDiTConfig, got {type(config).__name__}")
    if context_len < 1:
        raise ValueError(f"context_len must be ≥ 1 (the text tokens), got {context_len}")
    c = config
    D, depth, Lt = c.dim, c.depth, context_len
    T = ((image_size or c.input_size) // c.patch_size) ** 2
    hidden = int(D * c.mlp_ratio)
    per_token = 4 * D * D + 2 * D * hidden  # qkv + out-proj + MLP multiply-adds per token
    return {
        "patch_embed": 2 * T * c.patch_size**2 * c.in_channels * D,
        "context_embed": 2 * Lt * c.context_dim * D,
        "conditioning_mlps": 2 * (FREQUENCY_DIM * D + D * D) + 2 * (c.pooled_dim * D + D * D),
        "image_linears": 2 * T * depth * per_token,
        "text_linears": 2 * Lt * ((depth - 1) * per_token + 3 * D * D),  # last block: qkv only
        "joint_attention": 4 * depth * (T + Lt) ** 2 * D,
        "adaln": 2 * D * D * (6 * depth + 6 * (depth - 1) + 2),  # image 6D, text 6D (pre-only text: 2D)
        "final_adaln": 2 * D * 2 * D,
        "final_linear": 2 * T * D * c.patch_size**2 * c.in_channels,
    }


def mmdit_flops(config: MMDiTConfig, context_len: int, image_size: int | None = None) -> int:
    """Forward FLOPs per image of an MMDiT (2 × multiply-adds)."""
    return sum(mmdit_flops_breakdown(config, context_len, image_size).values())


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
    weights = pixels * c.in_channels * c.dim + FREQUENCY_DIM * c.dim + 3 * c.dim**2 + c.dim * pixels * c.out_channels
    return 3 * (2 if bf16 else 4) * c.dim * c.num_tokens * batch + (2 * weights if bf16 else 0)


def dit_activation_bytes(config: DiTConfig, batch: int = 1, bf16: bool = False,
                         grad_checkpointing: bool = False, device: torch.device | str = "cpu") -> int:
    """Bytes autograd holds for backward at the end of a DiT's forward pass (adaLN-Zero blocks) on `device`.

    Per token and block, counted from what each op saves (checked with `saved_tensor_bytes` in tests/test_cost.py):
      fp32: 12 + 2·r vectors of width D (r = mlp_ratio): the two LayerNorm inputs and outputs (4), the qkv and fc1
            inputs (2), q, k, v (3), the attention output (1) and out-projection output (1), fc1 output and GELU
            output (2·r), fc2 output (1); SDPA keeps only a log-sum-exp per head, no T×T matrix.
      bf16 autocast: all 12 + 2·r in bf16 (half the bytes; the residual stream starts in the patch conv's bf16,
            `minidit.tokens.add_positions`), plus the bf16 copies of the block's weights.
      On a CPU, short sequences (fp32 ≤ 64 tokens, bf16 ≤ 512, `minidit.attention.runs_unfused`) run attention
            unfused, which keeps each head's T×T weights instead of SDPA's log-sum-exp (under bf16 below 32 tokens
            both the fp32 softmax output and its bf16 copy, `minidit.attention.FP32_SOFTMAX_BELOW_KEYS`).
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


def dit_cost_at(
    config: DiTConfig,
    image_size: int,
    latent_factor: int = 1,
    patch_size: int | None = None,
    batch: int = 1,
    bf16: bool = False,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Cost of `config`'s architecture for image_size² pixels, a VAE of `latent_factor` and a patch size.

    Returns tokens, forward GFLOPs per image, the attention share of them, and training activation memory (MB) for
    `batch` images: the numbers behind "high resolution needs latents and patches" (notebook 12).
    """
    if image_size % latent_factor:
        raise ValueError(f"image_size {image_size} is not divisible by latent_factor {latent_factor}")
    side = image_size // latent_factor
    p = config.patch_size if patch_size is None else patch_size
    if side % p:
        raise ValueError(f"latent side {side} is not divisible by patch size {p}")
    cfg = replace(config, input_size=side, patch_size=p, attn=None)
    terms = dit_flops_breakdown(cfg)
    flops = sum(terms.values())
    return {
        "image_size": image_size, "latent_factor": latent_factor, "patch_size": p, "tokens": cfg.num_tokens,
        "gflops": flops / 1e9, "attention_share": terms["attention"] / flops,
        "activation_mb": dit_activation_bytes(cfg, batch, bf16, device=device) / 2**20,
    }


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
