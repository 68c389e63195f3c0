"""A11 — cross-resolution attention for an hourglass DiT: fine tokens attend, in one softmax, to the tokens of their
own window×window tile and to every coarse token; 2×2 token merging and splitting between the levels.

References: `minidit.variants.hires` (merge_tokens, split_tokens, cross_resolution_attention,
CrossResolutionAttention) and `minidit.variants.attention.window_mask` (the same pattern as a dense mask; HDiT,
Crowson et al. 2024, for the hourglass). The notebook fixes the module's attribute names (qkv, kv_coarse, proj,
q_norm, k_norm) so the package module's weights load into the student's module and the outputs can be compared.
"""

from __future__ import annotations

import torch

from minidit.grading.checks import Check, randn, randomize_
from minidit.variants import attention as variant_attention
from minidit.variants import hires

NAME = "A11_cross_resolution"
TITLE = "Cross-resolution attention for an hourglass DiT"
DISABLED = ["minidit.variants.hires:merge_tokens", "minidit.variants.hires:split_tokens",
            "minidit.variants.hires:cross_resolution_attention",
            "minidit.variants.hires:CrossResolutionAttention.forward",
            "minidit.variants.attention:window_mask", "minidit.variants.attention:to_tiles",
            "minidit.variants.attention:from_tiles"]

B, H, HD = 2, 2, 8
D, DC = 16, 24


def _qkv(seed: int, grid: tuple[int, int], tc: int) -> list[torch.Tensor]:
    T = grid[0] * grid[1]
    return [randn(seed + i, B, H, n, HD) for i, n in enumerate((T, T, T, tc, tc))]


def _merge_probe(merge_tokens) -> list:
    return [merge_tokens(torch.arange(16.0).reshape(1, 16, 1), 4), merge_tokens(randn(1, 3, 36, 5), 6)]


def _merge_expect() -> list:
    return [hires.merge_tokens(torch.arange(16.0).reshape(1, 16, 1), 4), hires.merge_tokens(randn(1, 3, 36, 5), 6)]


def _split_probe(split_tokens, merge_tokens) -> list:
    y = randn(2, 2, 64, 3)
    return [split_tokens(randn(3, 2, 4, 12), 4), split_tokens(merge_tokens(y, 8), 8) - y]


def _split_expect() -> list:
    return [hires.split_tokens(randn(3, 2, 4, 12), 4), torch.zeros(2, 64, 3)]


def _mask_probe(cross_resolution_mask) -> list:
    return [cross_resolution_mask(4, 4, 2, 1).int(), cross_resolution_mask(4, 6, 2, 3).int(),
            cross_resolution_mask(6, 9, 3, 0).int()]


def _mask_expect() -> list:
    return [variant_attention.window_mask(h, w, win, g).int() for h, w, win, g in ((4, 4, 2, 1), (4, 6, 2, 3),
                                                                                  (6, 9, 3, 0))]


def _attn_probe(cross_resolution_attention) -> torch.Tensor:
    return cross_resolution_attention(*_qkv(0, (4, 4), 4), (4, 4), 2)


def _attn_expect() -> torch.Tensor:
    return hires.cross_resolution_attention(*_qkv(0, (4, 4), 4), (4, 4), 2)


def _attn_rect_probe(cross_resolution_attention) -> list:
    return [cross_resolution_attention(*_qkv(10, (6, 9), 5), (6, 9), 3),
            cross_resolution_attention(*_qkv(20, (4, 8), 1), (4, 8), 4)]


def _attn_rect_expect() -> list:
    return [hires.cross_resolution_attention(*_qkv(10, (6, 9), 5), (6, 9), 3),
            hires.cross_resolution_attention(*_qkv(20, (4, 8), 1), (4, 8), 4)]


def _locality_probe(cross_resolution_attention) -> dict:
    """A fine key outside a query's tile must not reach it; a coarse key must reach every query."""
    grid, win = (4, 6), 2
    q, k, v, kc, vc = _qkv(30, grid, 3)
    out = cross_resolution_attention(q, k, v, kc, vc, grid, win)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 5], v2[:, :, 5] = k[:, :, 5] + 3.0, v[:, :, 5] + 3.0  # token (0, 5): the top-right tile
    far = cross_resolution_attention(q, k2, v2, kc, vc, grid, win)
    kc2 = kc.clone()
    kc2[:, :, 0] += 3.0
    coarse = cross_resolution_attention(q, k, v, kc2, vc, grid, win)
    changed = (far - out).abs().amax(dim=(0, 1, 3)) > 1e-6  # (T,): which queries saw the change
    return {"queries_changed_by_a_fine_key": changed.nonzero().flatten().tolist(),
            "every_query_sees_the_coarse_tokens": bool(((coarse - out).abs().amax(dim=(0, 1, 3)) > 1e-6).all())}


def _reference(qk_norm: bool) -> hires.CrossResolutionAttention:
    return randomize_(hires.CrossResolutionAttention(D, H, (4, 4), 2, DC, qk_norm=qk_norm), seed=40 + qk_norm)


def _run_module(CrossResolutionAttention, qk_norm: bool) -> list:
    m = CrossResolutionAttention(D, H, (4, 4), 2, DC, qk_norm=True) if qk_norm else \
        CrossResolutionAttention(D, H, (4, 4), 2, DC)
    m.load_state_dict(_reference(qk_norm).state_dict())
    return [m(randn(41, B, 16, D), randn(42, B, 4, DC)), m(randn(43, 1, 16, D), randn(44, 1, 1, DC))]


def _module_probe(CrossResolutionAttention) -> list:
    return _run_module(CrossResolutionAttention, qk_norm=False)


def _module_qk_probe(CrossResolutionAttention) -> list:
    return _run_module(CrossResolutionAttention, qk_norm=True)


@torch.no_grad()
def _module_expect(qk_norm: bool = False) -> list:
    ref = _reference(qk_norm)
    return [ref(randn(41, B, 16, D), randn(42, B, 4, DC)), ref(randn(43, 1, 16, D), randn(44, 1, 1, DC))]


CHECKS = [
    Check("merge_tokens: each 2×2 group of neighbouring tokens becomes one token (features ordered row, column, D)",
          points=2, probe=_merge_probe, expect=_merge_expect),
    Check("split_tokens: the inverse of merge_tokens", points=1, probe=_split_probe, expect=_split_expect),
    Check("cross_resolution_mask: a query sees the keys of its own tile and every coarse key", points=1,
          probe=_mask_probe, expect=_mask_expect),
    Check("cross_resolution_attention: one softmax over [tile keys; coarse keys] (= minidit.variants.hires)",
          points=2, probe=_attn_probe, expect=_attn_expect),
    Check("cross_resolution_attention: rectangular grids, other window sizes, one coarse token", points=1,
          probe=_attn_rect_probe, expect=_attn_rect_expect),
    Check("cross_resolution_attention: fine keys stay in their tile, coarse keys reach every query", points=1,
          probe=_locality_probe,
          expect=lambda: {"queries_changed_by_a_fine_key": [4, 5, 10, 11],
                          "every_query_sees_the_coarse_tokens": True}),
    Check("CrossResolutionAttention: the package module's weights give the same outputs", points=2,
          probe=_module_probe, expect=_module_expect),
    Check("CrossResolutionAttention(qk_norm=True): RMSNorm of q and of the fine and coarse keys, per head",
          points=1, probe=_module_qk_probe, expect=lambda: _module_expect(qk_norm=True)),
]
