"""A5 — the seed bug hunt: fix the seed document's DiTBlock into a correct adaLN-Zero block with cross-attention.

The fixed block keeps the seed's building blocks (nn.MultiheadAttention, norm1/norm2/norm3) with the layout the
notebook prescribes: norm1 → self_attn, norm2 → cross_attn (only with context_dim), norm3 → mlp
(Sequential: Linear, tanh-GELU, Linear, hidden width int(mlp_ratio·d_model)), adaLN_mod = Sequential(SiLU,
Linear(d_model, 6·d_model)), and forward(x, c, context=None, context_mask=None) with context_mask True = a real token.
The notebook states this interface and the properties of a correct block, not the seed's defects; one or more checks
below fail for each defect of the seed's block, and for a block that ignores mlp_ratio (tests/test_grading.py).
"""

from __future__ import annotations

import torch
from torch import nn

from minidit import models
from minidit.assignments.common import judge_invariance
from minidit.grading.checks import Check, randn, randomize_

NAME = "A5_seed_bug_hunt"
TITLE = "The seed bug hunt: fix the seed's DiTBlock"
DISABLED = ["minidit.models:DiTBlock.forward"]

D, HEADS, CTX, B, N, L = 32, 4, 24, 2, 6, 5


def seed_layout_state_dict(pkg: models.DiTBlock, block: nn.Module) -> dict[str, torch.Tensor]:
    """The package DiTBlock's weights under the fixed seed block's names (nn.MultiheadAttention layout)."""
    s = pkg.state_dict()
    out = {
        "self_attn.in_proj_weight": s["attn.qkv.weight"], "self_attn.in_proj_bias": s["attn.qkv.bias"],
        "self_attn.out_proj.weight": s["attn.proj.weight"], "self_attn.out_proj.bias": s["attn.proj.bias"],
        "mlp.0.weight": s["mlp.fc1.weight"], "mlp.0.bias": s["mlp.fc1.bias"],
        "mlp.2.weight": s["mlp.fc2.weight"], "mlp.2.bias": s["mlp.fc2.bias"],
        "adaLN_mod.1.weight": s["adaLN_modulation.1.weight"], "adaLN_mod.1.bias": s["adaLN_modulation.1.bias"],
    }
    if pkg.cross_attn is not None:
        k_w, v_w = s["cross_attn.kv.weight"].chunk(2)  # the package's kv Linear: keys first, then values
        if getattr(getattr(block, "cross_attn", None), "_qkv_same_embed_dim", False):
            out["cross_attn.in_proj_weight"] = torch.cat([s["cross_attn.q.weight"], k_w, v_w])
        else:
            out["cross_attn.q_proj_weight"] = s["cross_attn.q.weight"]
            out["cross_attn.k_proj_weight"], out["cross_attn.v_proj_weight"] = k_w, v_w
        out["cross_attn.in_proj_bias"] = torch.cat([s["cross_attn.q.bias"], s["cross_attn.kv.bias"]])
        out["cross_attn.out_proj.weight"] = s["cross_attn.proj.weight"]
        out["cross_attn.out_proj.bias"] = s["cross_attn.proj.bias"]
    return out


def _package(context_dim: int | None, seed: int | None, mlp_ratio: float = 4.0) -> models.DiTBlock:
    block = models.DiTBlock(D, HEADS, context_dim=context_dim, mlp_ratio=mlp_ratio)
    return block if seed is None else randomize_(block, seed)


def _loaded(DiTBlock, context_dim: int | None, seed: int, mlp_ratio: float = 4.0) -> nn.Module:
    block = DiTBlock(D, HEADS, context_dim=context_dim, mlp_ratio=mlp_ratio)
    block.load_state_dict(seed_layout_state_dict(_package(context_dim, seed, mlp_ratio), block))
    return block


def _inputs(seed: int, width: int = CTX, length: int = L):
    mask = torch.ones(B, length, dtype=torch.bool)
    if length > 2:
        mask[0, -2:] = False  # sample 0: the last two context tokens are padding
    return randn(seed, B, N, D), randn(seed + 1, B, D), randn(seed + 2, B, length, width), mask


# ---- probes (sandbox) and references (grader) ----------------------------------------------------------------
def _shapes(DiTBlock) -> list:
    block = randomize_(DiTBlock(D, HEADS, context_dim=D), seed=1)
    x, c, _, _ = _inputs(2)
    return [list(block(x, c, randn(5 + n, B, n, D)).shape) for n in (L, N, 1)]


def _per_sample(DiTBlock) -> dict:
    block = randomize_(DiTBlock(D, HEADS, context_dim=CTX), seed=10)
    x, c, ctx, mask = _inputs(11)
    out = block(x, c, ctx, mask)
    x2, c2, ctx2 = x.clone(), c.clone(), ctx.clone()
    x2[1], c2[1], ctx2[1] = randn(15, N, D), randn(16, D), randn(17, L, CTX)
    out2 = block(x2, c2, ctx2, mask)
    return {"sample0": float((out[0] - out2[0]).abs().max()), "sample1": float((out[1] - out2[1]).abs().max())}


def _judge_per_sample(got, _) -> str | None:
    return judge_invariance(got, "sample0", "sample1",
                            "changing sample 1's x, c and context changed sample 0's output by {change}",
                            "changing sample 1's inputs did not change its output: are x, c and context all used?")


def _widths(DiTBlock) -> list:
    shapes = []
    for width in (CTX, 48):
        x, c, ctx, mask = _inputs(20, width=width)
        shapes.append(list(DiTBlock(D, HEADS, context_dim=width)(x, c, ctx, mask).shape))
    return shapes


def _describe(m: nn.Module) -> list:
    if isinstance(m, nn.Linear):
        return ["Linear", m.in_features, m.out_features]
    if isinstance(m, nn.GELU):
        return ["GELU", m.approximate]
    return [type(m).__name__]


def _mlp_facts(DiTBlock) -> dict:
    block = DiTBlock(D, HEADS, context_dim=CTX)
    calls = []
    block.adaLN_mod.register_forward_hook(lambda *_: calls.append(1))
    block(*_inputs(25))
    return {"mlp": [_describe(m) for m in block.mlp.children()], "adaLN_calls": len(calls)}


def _gate_zero(rows: nn.Linear) -> None:
    with torch.no_grad():
        rows.weight[5 * D :] = 0  # chunk 6 of (shift, scale, gate) × (attention, MLP): gate_mlp
        rows.bias[5 * D :] = 0


def _gate_probe(DiTBlock) -> list:
    block = _loaded(DiTBlock, CTX, seed=30)
    _gate_zero(block.adaLN_mod[-1])
    inputs = _inputs(31)
    out = block(*inputs)
    with torch.no_grad():
        for p in block.mlp.parameters():
            p.add_(randn(32, *p.shape))
    return [out, block(*inputs)]


def _gate_expect() -> list:
    ref = _package(CTX, seed=30)
    _gate_zero(ref.adaLN_modulation[-1])
    out = ref(*_inputs(31))
    return [out, out]


def _grads(block: nn.Module, linear: nn.Linear) -> dict:
    out = block(*_inputs(40))
    (out * randn(43, B, N, D)).sum().backward()
    return {"weight": linear.weight.grad, "bias": linear.bias.grad}


def _grad_probe(DiTBlock) -> dict:
    block = _loaded(DiTBlock, CTX, seed=41)
    return _grads(block, block.adaLN_mod[-1])


def _grad_expect() -> dict:
    ref = _package(CTX, seed=41)
    return _grads(ref, ref.adaLN_modulation[-1])


def _loaded_probe(DiTBlock) -> list:
    x, c, ctx, mask = _inputs(50)
    cross, plain = _loaded(DiTBlock, CTX, seed=51), _loaded(DiTBlock, None, seed=52)
    return [cross(x, c, ctx, mask), cross(x, c, ctx), plain(x, c)]


def _loaded_expect() -> list:
    x, c, ctx, mask = _inputs(50)
    cross, plain = _package(CTX, seed=51), _package(None, seed=52)
    return [cross(x, c, ctx, mask), cross(x, c, ctx), plain(x, c)]


def _identity(DiTBlock) -> list:
    x, c, ctx, mask = _inputs(60)
    return [DiTBlock(D, HEADS)(x, c), DiTBlock(D, HEADS, context_dim=CTX)(x, c, ctx, mask)]


def _silu(DiTBlock) -> list:
    ada = DiTBlock(D, HEADS, context_dim=CTX).adaLN_mod
    return [_describe(m) for m in ada.children()] or [_describe(ada)]


def _norms(DiTBlock) -> list:
    block = DiTBlock(D, HEADS, context_dim=CTX)
    return [[m.elementwise_affine, m.eps] for m in block.modules() if isinstance(m, nn.LayerNorm)]


def _judge_norms(got, _) -> str | None:
    if not isinstance(got, list) or len(got) < 2:
        return f"expected at least two nn.LayerNorm modules in the block, found {got!r}"
    if any(g != [False, 1e-6] for g in got):
        return (f"expected every LayerNorm to have elementwise_affine=False and eps=1e-6 (adaLN supplies the "
                f"affine), got [elementwise_affine, eps] = {got}")
    return None


def _padding(DiTBlock) -> dict:
    block = randomize_(DiTBlock(D, HEADS, context_dim=CTX), seed=70)
    x, c, ctx, mask = _inputs(71)
    out = block(x, c, ctx, mask)
    padded = torch.where(mask[..., None], ctx, 100 * randn(74, B, L, CTX))
    real = ctx.clone()
    real[0, 0] += 1.0  # a real token of sample 0
    return {"padded": float((block(x, c, padded, mask) - out).abs().max()),
            "real": float((block(x, c, real, mask) - out).abs().max())}


def _judge_padding(got, _) -> str | None:
    return judge_invariance(got, "padded", "real",
                            "changing padded context tokens changed the output by {change}: use the key padding mask",
                            "changing a real context token did not change the output: is the context attended to?")


def _ratio_probe(DiTBlock) -> dict:
    block = DiTBlock(D, HEADS, context_dim=CTX, mlp_ratio=2.0)
    loaded = _loaded(DiTBlock, CTX, seed=90, mlp_ratio=2.0)
    return {"mlp": [_describe(m) for m in block.mlp.children()], "output": loaded(*_inputs(91))}


def _ratio_expect() -> dict:
    return {"mlp": [["Linear", D, 2 * D], ["GELU", "tanh"], ["Linear", 2 * D, D]],
            "output": _package(CTX, seed=90, mlp_ratio=2.0)(*_inputs(91))}


def _init_grad(DiTBlock) -> float:
    block = DiTBlock(D, HEADS, context_dim=CTX)
    out = block(*_inputs(80))
    (out * randn(83, B, N, D)).sum().backward()
    grad = block.adaLN_mod[-1].weight.grad
    return 0.0 if grad is None else float(grad.abs().sum())


def _judge_init_grad(got, _) -> str | None:
    if isinstance(got, float) and got > 1e-6:
        return None
    return (f"at initialisation the adaLN layer's gradient is {got!r}: zero-initialise only the adaLN Linear (and "
            "the ungated cross-attention's output), not the self-attention/MLP outputs too, or nothing ever learns")


CHECKS = [
    Check("forward(x, c, context): output (B, N, D) for context lengths L ≠ N, L = N and L = 1", points=1,
          probe=_shapes, expect=lambda: [[B, N, D]] * 3),
    Check("each sample's output depends only on its own x, c and context", points=1,
          probe=_per_sample, judge=_judge_per_sample),
    Check("cross-attention takes a context width ≠ d_model (kdim/vdim): widths 24 and 48", points=1,
          probe=_widths, expect=lambda: [[B, N, D]] * 2),
    Check("a real MLP (Linear d→4d, tanh-GELU, Linear 4d→d) and adaLN_mod called once per forward", points=1,
          probe=_mlp_facts, expect=lambda: {"mlp": [["Linear", D, 4 * D], ["GELU", "tanh"], ["Linear", 4 * D, D]],
                                            "adaLN_calls": 1}),
    Check("gate_mlp = 0 ⇒ the MLP's weights cannot change the output", points=1,
          probe=_gate_probe, expect=_gate_expect),
    Check("shift, scale and gate of both sublayers receive the right gradients", points=1,
          probe=_grad_probe, expect=_grad_expect, atol=1e-4, rtol=1e-3),
    Check("with the package DiTBlock's weights: identical outputs (with/without mask, without cross-attention)",
          points=3, probe=_loaded_probe, expect=_loaded_expect),
    Check("a fresh block is the identity (adaLN-Zero), with and without cross-attention", points=1,
          probe=_identity, expect=lambda: [randn(60, B, N, D)] * 2),
    Check("SiLU is a registered module on the conditioning path: adaLN_mod = Sequential(SiLU, Linear(d, 6d))",
          points=1, probe=_silu, expect=lambda: [["SiLU"], ["Linear", D, 6 * D]]),
    Check("LayerNorms are non-affine with eps = 1e-6", points=1, probe=_norms, judge=_judge_norms),
    Check("padded context tokens (context_mask False) do not change the output", points=1,
          probe=_padding, judge=_judge_padding),
    Check("at initialisation the adaLN layer receives a gradient (the block can learn)", points=1,
          probe=_init_grad, judge=_judge_init_grad),
    Check("mlp_ratio sets the MLP's hidden width (mlp_ratio = 2: Linear d→2d, then 2d→d), with the same outputs",
          points=1, probe=_ratio_probe, expect=_ratio_expect),
]
