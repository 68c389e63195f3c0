"""A11 (cross-resolution attention): each known-wrong implementation — two softmaxes, no coarse keys, tiles cut as
strips, no 1/√d, tokens merged in the wrong order, the coarse keys left un-normalised … — loses the check it should.

Full marks for the solution and 0 for the exercise are tested for every assignment in tests/test_grading.py.
"""

import pytest
from test_grading import variant

from minidit.grading import Grader

NAME = "A11_cross_resolution"


@pytest.fixture(scope="module")
def grader():
    with Grader(memory_mb=1024) as g:
        yield g


WEIGHTS = ("    weights = (qt @ kt.transpose(-2, -1) / math.sqrt(d)).softmax(dim=-1)  "
           "# (B, H, n, window², window² + Tc)\n")
# label → (replacements in the solution, the check (name prefix) it must lose)
WRONG = {
    "merge: the pair axes left in place (4 tokens of one row merged)": (
        [("    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, row, column, row in pair, column in pair, D)\n", "")],
        "merge_tokens"),
    "split: not the inverse of merge": (
        [("    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, row, row in pair, column, column in pair, D)\n", "")],
        "split_tokens"),
    "mask: tiles as whole rows of tiles": (
        [("    same = (tile_row[:, None] == tile_row[None, :]) & (tile_col[:, None] == tile_col[None, :])  # (T, T)\n",
          "    same = tile_row[:, None] == tile_row[None, :]\n")],
        "cross_resolution_mask"),
    "mask: no coarse columns": (
        [("torch.ones(h * w, n_coarse, dtype=torch.bool)", "torch.zeros(h * w, n_coarse, dtype=torch.bool)")],
        "cross_resolution_mask"),
    "tiles cut as strips of a row (no permute)": (
        [("        z = z.reshape(B, H, h // window, window, w // window, window, d).permute(0, 1, 2, 4, 3, 5, 6)\n",
          "        z = z.reshape(B, H, h // window, window, w // window, window, d)\n")],
        "cross_resolution_attention: fine keys stay in their tile"),
    "tokens not put back in row-major order": (
        [("    return out.permute(0, 1, 2, 4, 3, 5, 6).reshape(B, H, T, d)\n", "    return out.reshape(B, H, T, d)\n")],
        "cross_resolution_attention: one softmax"),
    "two softmaxes (tile, coarse), averaged": (
        [(WEIGHTS, "    s = qt @ kt.transpose(-2, -1) / math.sqrt(d)\n"
                   "    weights = torch.cat([s[..., :window * window].softmax(-1),"
                   " s[..., window * window:].softmax(-1)], -1) / 2\n")],
        "cross_resolution_attention: one softmax"),
    "no coarse keys (tiles only)": (
        [("    kt = torch.cat([kt, k_coarse[:, :, None].expand(-1, -1, n, -1, -1)], dim=3)  "
          "# (B, H, n, window² + Tc, d)\n"
          "    vt = torch.cat([vt, v_coarse[:, :, None].expand(-1, -1, n, -1, -1)], dim=3)\n", "")],
        "cross_resolution_attention: fine keys stay in their tile, coarse keys reach every query"),
    "no 1/sqrt(d) scaling": (
        [(WEIGHTS, "    weights = (qt @ kt.transpose(-2, -1)).softmax(dim=-1)\n")],
        "cross_resolution_attention: one softmax"),
    "coarse keys used as values": (
        [("self.k_norm(kc), vc, self.grid", "self.k_norm(kc), kc, self.grid")],
        "CrossResolutionAttention: the package"),
    "coarse keys and values swapped": (
        [("        kc, vc = self.kv_coarse(coarse)", "        vc, kc = self.kv_coarse(coarse)")],
        "CrossResolutionAttention: the package"),
    "coarse keys not RMS-normalised": (
        [("self.k_norm(kc), vc, self.grid", "kc, vc, self.grid")],
        "CrossResolutionAttention(qk_norm=True)"),
}


@pytest.mark.parametrize("label", sorted(WRONG))
def test_known_wrong_implementation_fails(grader, tmp_path, label):
    replacements, expected = WRONG[label]
    results = grader.grade(variant(tmp_path, NAME, replacements), assignment=NAME)
    lost = [t["name"] for t in results["tests"] if t["score"] < t["max_score"]]
    assert lost, f"'{label}' scored full marks"
    assert any(n.startswith(expected) for n in lost), f"'{label}' lost {lost}, not '{expected}…'"
