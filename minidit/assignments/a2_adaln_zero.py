"""A2 — the adaLN-Zero DiT block: `modulate`, `Mlp`, `DiTBlock`, checked against `minidit.models`.

The notebook fixes the attribute names (norm1, attn, norm2, mlp.fc1/act/fc2, adaLN_modulation = SiLU → Linear)
so that the package block's weights load into the student's block and the outputs can be compared exactly.
"""

from __future__ import annotations

import torch

from minidit import models
from minidit.grading.checks import Answer, Check, randn, randomize_

NAME = "A2_adaln_zero"
TITLE = "The adaLN-Zero block"
DISABLED = ["minidit.models:modulate", "minidit.models:Mlp.forward", "minidit.models:DiTBlock.forward"]

D, H, B, T = 32, 4, 3, 6


def _modulate_cases(modulate) -> list:
    # B = T = 3 makes a wrong broadcast (over the batch instead of the tokens) run silently, and wrong
    return [modulate(randn(1, 2, 5, 8), randn(2, 2, 8), randn(3, 2, 8)),
            modulate(randn(4, 3, 3, 4), randn(5, 3, 4), randn(6, 3, 4))]


def _modulate_answer() -> Answer:
    def over_batch(x, shift, scale):
        return x * (1 + scale.unsqueeze(0)) + shift.unsqueeze(0)

    def without_one(x, shift, scale):
        return x * scale.unsqueeze(1) + shift.unsqueeze(1)

    return Answer(_modulate_cases(models.modulate), {
        "shift and scale are broadcast over the batch axis; each image's vectors must apply to all of its tokens "
        "(a token axis of size 1)": lambda: _modulate_cases(over_batch),
        "the scale is applied as x·scale; adaLN uses x·(1 + scale), so that scale = 0 leaves x unchanged":
        lambda: _modulate_cases(without_one)})


def _reference_mlp() -> models.Mlp:
    return randomize_(models.Mlp(D, 4 * D), seed=10)


def _mlp_probe(Mlp) -> torch.Tensor:
    m = Mlp(D, 4 * D)
    m.load_state_dict(_reference_mlp().state_dict())
    return m(3 * randn(11, B, T, D))  # large inputs: tanh-GELU and exact GELU differ by ~1e-3 here


def _reference_block(seed: int | None) -> models.DiTBlock:
    block = models.DiTBlock(D, H)
    return block if seed is None else randomize_(block, seed)


def _state_keys(DiTBlock) -> dict:
    blocks = {f"mlp_ratio = {ratio:g}": DiTBlock(D, H, mlp_ratio=ratio) for ratio in (4.0, 2.0)}
    return {name: {k: list(v.shape) for k, v in block.state_dict().items()} for name, block in blocks.items()}


def _fresh_probe(DiTBlock) -> torch.Tensor:
    return DiTBlock(D, H)(randn(20, B, T, D), randn(21, B, D))


def _loaded_probe(DiTBlock) -> list:
    block = DiTBlock(D, H)
    block.load_state_dict(_reference_block(seed=22).state_dict())
    return [block(randn(23, B, T, D), randn(24, B, D)), block(randn(25, 1, 1, D), randn(26, 1, D))]


def _loaded_expect() -> list:
    ref = _reference_block(seed=22)
    return [ref(randn(23, B, T, D), randn(24, B, D)), ref(randn(25, 1, 1, D), randn(26, 1, D))]


def _grads(block: torch.nn.Module) -> dict:
    out = block(randn(30, B, T, D), randn(31, B, D))
    (out * randn(32, B, T, D)).sum().backward()
    return {k: p.grad for k, p in block.named_parameters() if p.grad is not None}


def _init_grads_probe(DiTBlock) -> dict:
    torch.manual_seed(33)
    ref = _reference_block(seed=None)  # the package's own initialisation: xavier, adaLN zeroed
    block = DiTBlock(D, H)
    block.load_state_dict(ref.state_dict())
    return _grads(block)


def _init_grads_expect() -> dict:
    torch.manual_seed(33)
    return _grads(_reference_block(seed=None))


def _own_init_probe(DiTBlock) -> float:
    block = DiTBlock(D, H)
    grads = _grads(block)
    w = block.adaLN_modulation[-1].weight
    return float(grads["adaLN_modulation.1.weight"].abs().sum()) if w.grad is not None else 0.0


def _norms(DiTBlock) -> list:
    block = DiTBlock(D, H)
    return [[m.elementwise_affine, m.eps] for m in (block.norm1, block.norm2)]


CHECKS = [
    Check("modulate: x·(1 + scale) + shift, broadcast over the tokens", points=1,
          probe=_modulate_cases, expect=_modulate_answer),
    Check("Mlp: fc1 → tanh-GELU → fc2 (same output as minidit.models.Mlp with the same weights)", points=1,
          probe=_mlp_probe, expect=lambda: _reference_mlp()(3 * randn(11, B, T, D))),
    Check("DiTBlock: parameter names and shapes match minidit.models.DiTBlock, for mlp_ratio 4 and 2", points=1,
          probe=_state_keys, expect=lambda: _state_keys(models.DiTBlock)),
    Check("DiTBlock: LayerNorms without affine parameters, eps = 1e-6", points=1,
          probe=_norms, expect=lambda: [[False, 1e-6], [False, 1e-6]], atol=1e-12, rtol=0),
    Check("DiTBlock: a freshly initialised block is the identity (adaLN-Zero)", points=2,
          probe=_fresh_probe, expect=lambda: randn(20, B, T, D)),
    Check("DiTBlock: with the package block's weights, the same outputs (chunk order, gates, modulation)", points=3,
          probe=_loaded_probe, expect=_loaded_expect),
    Check("DiTBlock: from the package's initial weights, the same gradients for every parameter", points=1,
          probe=_init_grads_probe, expect=_init_grads_expect, atol=1e-4, rtol=1e-3),
    Check("DiTBlock: its own initialisation lets the adaLN layer learn (non-zero gradient at step 0)", points=1,
          probe=_own_init_probe, judge=lambda got, want: None if isinstance(got, float) and got > 1e-6 else
          f"the adaLN layer's gradient is {got!r} at initialisation: zero only the adaLN Linear, not the "
          "attention/MLP output projections too (then every gradient is zero and the block never learns)"),
]
