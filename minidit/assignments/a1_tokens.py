"""A1 — patch tokens: patchify, unpatchify and 2D sin-cos positions, checked against `minidit.tokens`."""

from __future__ import annotations

import torch

from minidit import tokens
from minidit.grading.checks import Answer, Check, expects_error, raised, randn

NAME = "A1_tokens"
TITLE = "Patch tokens and 2D sin-cos positions"
DISABLED = ["minidit.tokens:patchify", "minidit.tokens:unpatchify", "minidit.tokens:check_image",
            "minidit.tokens:sincos_1d", "minidit.tokens:sincos_2d", "minidit.tokens:PatchEmbed"]


def _patchify_cases(patchify) -> list:
    return [patchify(randn(1, 2, 3, 8, 8), 2), patchify(randn(2, 1, 1, 4, 4), 4)]


def _patchify_rect(patchify) -> list:
    return [patchify(randn(3, 1, 2, 4, 12), 4), patchify(randn(4, 2, 3, 6, 2), 1)]


def _patchify_answer(cases) -> Answer:
    def channel_first(x, p):  # features (channel, row, column)
        B, C, H, W = x.shape
        return x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)

    def column_major(x, p):  # patches numbered down each column first
        B, C, H, W = x.shape
        return x.reshape(B, C, H // p, p, W // p, p).permute(0, 4, 2, 3, 5, 1).reshape(B, -1, C * p * p)

    return Answer(cases(tokens.patchify), {
        "the features inside a patch are in (channel, row, column) order; the instructions ask for (row in the "
        "patch, column in the patch, channel)": cases(channel_first),
        "the patches are numbered column by column; number them in row-major (reading) order": cases(column_major)})


def _grid_tokens(seed: int, h: int, w: int, p: int, c: int) -> torch.Tensor:
    return randn(seed, 2, h * w, p * p * c)


def _unpatchify_square(unpatchify) -> torch.Tensor:
    return unpatchify(_grid_tokens(5, 4, 4, 2, 3), 2, 3)


def _unpatchify_rect(unpatchify) -> list:
    return [unpatchify(_grid_tokens(6, 2, 6, 2, 2), 2, 2, 2, 6), unpatchify(_grid_tokens(7, 3, 1, 4, 1), 4, 1, 3, 1)]


def _unpatchify_rect_expect() -> Answer:
    def swapped(tok, p, c, h, w):  # the token grid's axes exchanged before merging
        x = tok.reshape(tok.shape[0], h, w, p, p, c).permute(0, 5, 2, 3, 1, 4)  # (B, C, w, p, h, q)
        return x.reshape(tok.shape[0], c, h * p, w * p)

    cases = [(_grid_tokens(6, 2, 6, 2, 2), 2, 2, 2, 6), (_grid_tokens(7, 3, 1, 4, 1), 4, 1, 3, 1)]
    return Answer([tokens.unpatchify(*c) for c in cases],
                  {"the token grid's rows and columns are swapped: token i·w + j is the patch in row i, column j":
                   [swapped(*c) for c in cases]})


def _sincos_answer(cases) -> Answer:
    def row_first(dim, h, w=None):
        w = h if w is None else w
        table = tokens.sincos_2d(dim, h, w)
        return torch.cat([table[:, dim // 2:], table[:, : dim // 2]], dim=1)

    def cos_first(dim, h, w=None):
        table = tokens.sincos_2d(dim, h, w).reshape(-1, 4, dim // 4)  # [sin, cos] for the column, then the row
        return table[:, [1, 0, 3, 2]].reshape(-1, dim)

    return Answer(cases(tokens.sincos_2d), {
        "the row's half comes first; the column's half (j) must come first, then the row's (i)": cases(row_first),
        "cos comes before sin; each half is [sin(pos·ω_0), …, cos(pos·ω_0), …]": cases(cos_first)})


def _sincos_square(sincos_2d) -> torch.Tensor:
    return sincos_2d(16, 4)


def _sincos_rect(sincos_2d) -> list:
    return [sincos_2d(8, 3, 5), sincos_2d(8, 1, 7)]


CHECKS = [
    Check("patchify: (B, C, H, W) → (B, T, p·p·C) on square images, p = 2 and 4", points=2,
          probe=_patchify_cases, expect=lambda: _patchify_answer(_patchify_cases)),
    Check("patchify: non-square images (4×12, p = 4) and p = 1", points=1,
          probe=_patchify_rect, expect=lambda: _patchify_answer(_patchify_rect)),
    Check("patchify: raises ValueError when H or W is not divisible by p", points=1,
          probe=lambda patchify: raised(patchify, randn(7, 1, 1, 7, 8), 2), judge=expects_error("ValueError")),
    Check("unpatchify: (B, T, p·p·C) → (B, C, H, W), the inverse of patchify, on a square grid", points=2,
          probe=_unpatchify_square, expect=lambda: tokens.unpatchify(_grid_tokens(5, 4, 4, 2, 3), 2, 3)),
    Check("unpatchify: non-square grids (h = 2, w = 6 and h = 3, w = 1)", points=1,
          probe=_unpatchify_rect, expect=_unpatchify_rect_expect),
    Check("unpatchify: raises ValueError when the token width is not p·p·channels", points=1,
          probe=lambda unpatchify: raised(unpatchify, randn(8, 2, 4, 12), 2, 2), judge=expects_error("ValueError")),
    Check("sincos_2d: a 4×4 grid, dim = 16 (column half first, [sin, cos] in each half)", points=2,
          probe=_sincos_square, expect=lambda: _sincos_answer(_sincos_square)),
    Check("sincos_2d: non-square grids (3×5 and 1×7, dim = 8)", points=1,
          probe=_sincos_rect, expect=lambda: _sincos_answer(_sincos_rect)),
    Check("sincos_2d: raises ValueError when dim is not a multiple of 4", points=1,
          probe=lambda sincos_2d: raised(sincos_2d, 10, 3), judge=expects_error("ValueError")),
]
