"""A3 — attention: scaled dot-product attention with a key padding mask, multi-head self- and cross-attention.

References: `minidit.attention` (explicit path for the weights) and `F.scaled_dot_product_attention`.
Masks follow the course convention: a bool (B, T_key) tensor, True = a real token that may be attended to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minidit import attention
from minidit.grading.checks import Answer, Check, randn, randomize_

NAME = "A3_attention"
TITLE = "Attention with masks, multi-head self- and cross-attention"
DISABLED = ["minidit.attention:attention", "minidit.attention:split_heads", "minidit.attention:merge_heads",
            "minidit.attention:AttentionModule.attend", "minidit.attention:Attention.forward",
            "minidit.attention:CrossAttention.forward"]

B, HEADS, TQ, TK, HD = 2, 3, 5, 7, 8
D, CTX, T, L = 16, 12, 6, 5


def _qkv(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return randn(seed, B, HEADS, TQ, HD), randn(seed + 1, B, HEADS, TK, HD), randn(seed + 2, B, HEADS, TK, HD)


def _key_mask(n: int) -> torch.Tensor:
    m = torch.ones(B, n, dtype=torch.bool)
    m[0, -3:] = False  # sample 0: the last 3 keys are padding; sample 1: none
    return m


def _sdpa_probe(scaled_dot_product_attention) -> dict:
    out, w = scaled_dot_product_attention(*_qkv(0))
    return {"out": out, "weights": w}


def _sdpa_expect() -> Answer:
    q, k, v = _qkv(0)
    _, w = attention.attention(q, k, v, return_weights=True)

    def explicit(scale: float, dim: int) -> dict:
        weights = (q @ k.transpose(-2, -1) * scale).softmax(dim=dim)
        return {"out": weights @ v, "weights": weights}

    return Answer({"out": F.scaled_dot_product_attention(q, k, v), "weights": w}, {
        "the scores are not scaled: divide q·kᵀ by √d (d = the size of one query)": lambda: explicit(1.0, -1),
        "the scores are divided by d; the scale is 1/√d": lambda: explicit(1 / HD, -1),
        "the softmax runs over the queries; each query's weights over the keys (the last axis) must sum to 1":
            lambda: explicit(HD**-0.5, -2)})


def _sdpa_mask_probe(scaled_dot_product_attention) -> dict:
    out, w = scaled_dot_product_attention(*_qkv(10), key_padding_mask=_key_mask(TK))
    return {"out": out, "weights": w}


def _sdpa_mask_expect() -> dict:
    q, k, v = _qkv(10)
    mask = _key_mask(TK)
    _, w = attention.attention(q, k, v, mask, return_weights=True)
    return {"out": F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :]), "weights": w}


def _self_ref() -> attention.Attention:
    return randomize_(attention.Attention(D, 4), seed=20)


def _self_probe(MultiHeadSelfAttention) -> list:
    m = MultiHeadSelfAttention(D, 4)
    m.load_state_dict(_self_ref().state_dict())
    return [m(randn(21, B, T, D)), m(randn(22, 1, 1, D))]


def _self_mask_probe(MultiHeadSelfAttention) -> dict:
    m = MultiHeadSelfAttention(D, 4)
    m.load_state_dict(_self_ref().state_dict())
    x, mask = randn(23, B, T, D), _key_mask(T)
    x2 = torch.where(mask[..., None], x, 100 * randn(24, B, T, D))  # change only the padded tokens
    out, out2 = m(x, key_padding_mask=mask), m(x2, key_padding_mask=mask)
    return {"out": out, "real_tokens_after_changing_padding": out2[mask]}


def _self_mask_expect() -> dict:
    x, mask = randn(23, B, T, D), _key_mask(T)
    out = _self_ref()(x, mask)
    return {"out": out, "real_tokens_after_changing_padding": out[mask]}


def _cross_ref(context_dim: int) -> attention.CrossAttention:
    return randomize_(attention.CrossAttention(D, context_dim, 4), seed=30 + context_dim)


def _cross_probe(CrossAttention) -> list:
    outs = []
    for cdim in (CTX, D):
        m = CrossAttention(D, cdim, 4)
        m.load_state_dict(_cross_ref(cdim).state_dict())
        outs.append(m(randn(31, B, T, D), randn(32, B, L, cdim)))
    return outs


def _cross_mask_probe(CrossAttention) -> dict:
    m = CrossAttention(D, CTX, 4)
    m.load_state_dict(_cross_ref(CTX).state_dict())
    x, ctx, mask = randn(33, B, T, D), randn(34, B, L, CTX), _key_mask(L)
    ctx2 = torch.where(mask[..., None], ctx, 100 * randn(35, B, L, CTX))
    return {"out": m(x, ctx, context_mask=mask), "after_changing_padding": m(x, ctx2, context_mask=mask)}


def _cross_mask_expect() -> dict:
    out = _cross_ref(CTX)(randn(33, B, T, D), randn(34, B, L, CTX), _key_mask(L))
    return {"out": out, "after_changing_padding": out}


CHECKS = [
    Check("scaled_dot_product_attention: output (= F.scaled_dot_product_attention) and weights, no mask", points=2,
          probe=_sdpa_probe, expect=_sdpa_expect),
    Check("scaled_dot_product_attention: key padding mask (True = attend; padded keys get weight 0)", points=2,
          probe=_sdpa_mask_probe, expect=_sdpa_mask_expect),
    Check("MultiHeadSelfAttention: the package Attention's weights give the same output", points=2,
          probe=_self_probe, expect=lambda: [_self_ref()(randn(21, B, T, D)), _self_ref()(randn(22, 1, 1, D))]),
    Check("MultiHeadSelfAttention: padded tokens do not change the real tokens' outputs", points=1,
          probe=_self_mask_probe, expect=_self_mask_expect),
    Check("CrossAttention: keys/values from a context of its own width (12 and 16), package weights", points=2,
          probe=_cross_probe,
          expect=lambda: [_cross_ref(c)(randn(31, B, T, D), randn(32, B, L, c)) for c in (CTX, D)]),
    Check("CrossAttention: padded context tokens do not change the output", points=1,
          probe=_cross_mask_probe, expect=_cross_mask_expect),
]
