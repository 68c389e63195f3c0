"""What a DiT costs: forward FLOPs per image with DiT's accounting.

FLOPs here are floating-point operations = 2 × multiply-adds (DiT's tables count multiply-adds: divide by 2).
Per image, with T tokens, L blocks, width D and MLP ratio 4:
    forward ≈ 2·T·(12·L·D²)   token-wise Linear layers (qkv 3D², out-proj D², MLP 8D²)
            + 4·L·T²·D        attention scores q·kᵀ and the weighted sum of values
            + per-image terms  timestep MLP and the adaLN regressions, which act once per image, not per token
            + patch embedding and the final Linear (2·T·p²·C·D each way).
Counting adaLN per token would overstate DiT-XL/2 by ~46%. Training costs ≈ 3 × forward (backward ≈ 2 × forward).
Only matrix products are counted (norms, activations and softmax are ignored, as in the papers).

Also here: the same accounting for SD3's MMDiT (`mmdit_flops`) and the cost of a DiT at any resolution / patch size /
latent factor (`dit_cost_at`). benchmarks/cost_model.py checks the model against measured step time; measuring
time, memory and utilisation is minidit.variants.speed's job.
"""

from __future__ import annotations

from dataclasses import replace

from minidit.mmdit import MMDiTConfig
from minidit.models import DiTConfig

FREQUENCY_DIM = 256  # the timestep embedder's sinusoidal features (minidit.embed)
ADALN_OUTPUTS = {"adaln-zero": 6, "adaln-gated": 6, "adaln": 4, "cross-attention": 0, "in-context": 0}  # × D per block


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
    conditioning = getattr(c, "conditioning", "adaln-zero")  # minidit.variants' configs carry these fields
    Tb = T + 2 if conditioning == "in-context" else T  # tokens inside the blocks
    kv_dim = (getattr(c, "n_kv_heads", None) or c.num_heads) * (D // c.num_heads)  # grouped-query: fewer k/v
    keys = Tb  # keys seen by each query: all tokens, or its window plus the global tokens
    if getattr(c, "window", None):
        keys = c.window**2 + c.global_tokens
    terms = {
        "patch_embed": 2 * T * (c.patch_size**2 * c.in_channels) * D,
        # qkv + out-proj + MLP = 12·D² for ratio 4 (qkv is (D + 2·kv_dim)·D with grouped-query attention)
        "block_linears": 2 * Tb * L * ((2 * D + 2 * kv_dim) * D + 2 * D * hidden),
        "attention": 4 * L * Tb * keys * D,  # q·kᵀ and weights·v, each T·keys·D multiply-adds
        "timestep_mlp": 2 * (FREQUENCY_DIM * D + D * D),
        "adaln": 2 * L * D * ADALN_OUTPUTS[conditioning] * D,  # once per image
        "final_adaln": 2 * D * 2 * D if conditioning.startswith("adaln") else 0,
        "final_linear": 2 * T * D * (c.patch_size**2 * c.in_channels),
    }
    if conditioning == "cross-attention":  # 2 condition tokens [t_emb, y_emb] of width D as keys/values
        terms["cross_attention"] = L * (2 * T * 2 * D * D + 2 * 2 * 2 * D * D + 4 * T * 2 * D)
    if c.pooled_dim is not None:  # a text DiT embeds its pooled caption vector with an MLP instead of a label lookup
        terms["pooled_mlp"] = 2 * (c.pooled_dim * D + D * D)
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


def dit_cost_at(config: DiTConfig, image_size: int, latent_factor: int = 1, patch_size: int | None = None
                ) -> dict[str, float]:
    """Cost of `config`'s architecture for image_size² pixels, a VAE of `latent_factor` and a patch size: tokens,
    forward GFLOPs per image and the attention share of them — why high resolution needs latents and patches."""
    side = image_size // latent_factor
    p = config.patch_size if patch_size is None else patch_size
    if image_size % latent_factor or side % p:
        raise ValueError(f"{image_size} pixels / latent factor {latent_factor} / patch {p} do not divide evenly")
    cfg = replace(config, input_size=side, patch_size=p)
    terms = dit_flops_breakdown(cfg)
    flops = sum(terms.values())
    return {"image_size": image_size, "latent_factor": latent_factor, "patch_size": p, "tokens": cfg.num_tokens,
            "gflops": flops / 1e9, "attention_share": terms["attention"] / flops}
