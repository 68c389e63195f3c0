"""A1 — patch tokens: patchify, unpatchify and 2D sin-cos positions, checked against `minidit.tokens`."""

from __future__ import annotations

import torch

from minidit import tokens
from minidit.grading.checks import Check, expects_error, raised, randn

NAME = "A1_tokens"
TITLE = "Patch tokens and 2D sin-cos positions"


def _patchify_cases(patchify) -> list:
    return [patchify(randn(1, 2, 3, 8, 8), 2), patchify(randn(2, 1, 1, 4, 4), 4)]


def _patchify_rect(patchify) -> list:
    return [patchify(randn(3, 1, 2, 4, 12), 4), patchify(randn(4, 2, 3, 6, 2), 1)]


def _unpatchify_square(unpatchify) -> torch.Tensor:
    return unpatchify(tokens.patchify(randn(5, 2, 3, 8, 8), 2), 2, 3)


def _unpatchify_rect(unpatchify) -> torch.Tensor:
    return unpatchify(tokens.patchify(randn(6, 2, 2, 4, 12), 2), 2, 2, 2, 6)


CHECKS = [
    Check("patchify: (B, C, H, W) → (B, T, p·p·C) on square images, p = 2 and 4", points=2,
          probe=_patchify_cases, expect=lambda: _patchify_cases(tokens.patchify)),
    Check("patchify: non-square images (4×12, p = 4) and p = 1", points=1,
          probe=_patchify_rect, expect=lambda: _patchify_rect(tokens.patchify)),
    Check("patchify: raises ValueError when H or W is not divisible by p", points=1,
          probe=lambda patchify: raised(patchify, randn(7, 1, 1, 7, 8), 2), judge=expects_error("ValueError")),
    Check("unpatchify: inverts patchify on a square grid", points=2,
          probe=_unpatchify_square, expect=lambda: randn(5, 2, 3, 8, 8)),
    Check("unpatchify: non-square grid (h = 2, w = 6)", points=1,
          probe=_unpatchify_rect, expect=lambda: randn(6, 2, 2, 4, 12)),
    Check("sincos_2d: a 4×4 grid, dim = 16 (column half first, [sin, cos] in each half)", points=2,
          probe=lambda sincos_2d: sincos_2d(16, 4), expect=lambda: tokens.sincos_2d(16, 4)),
    Check("sincos_2d: non-square grids (3×5 and 1×7, dim = 8)", points=1,
          probe=lambda sincos_2d: [sincos_2d(8, 3, 5), sincos_2d(8, 1, 7)],
          expect=lambda: [tokens.sincos_2d(8, 3, 5), tokens.sincos_2d(8, 1, 7)]),
]
