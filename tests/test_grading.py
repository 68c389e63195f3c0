"""The grader and the exercises: solutions score full marks, exercises 0, known-wrong code loses points (and fails a
self-check of its own notebook), hostile or broken submissions are graded without the grader crashing,
results.json follows Gradescope's format. Other test_grading_*.py files import the helpers defined here."""

import json
import os
import re
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nbformat
import pytest
import torch

from minidit.assignments import ASSIGNMENTS, for_notebook, get_assignment, resolve_name
from minidit.grading import Check, Grader, GradingError, compare, make_exercise, write_results
from minidit.grading.autograder import build_autograder
from minidit.grading.checks import Opaque, ProtocolError, decode, encode
from minidit.grading.exercises import ExerciseError, exercise_code, make_exercises
from minidit.grading.grader import RUNS_CLEANLY

ROOT = Path(__file__).resolve().parents[1]
NAMES = sorted(ASSIGNMENTS)
VISIBILITY = {"visible", "hidden", "after_due_date", "after_published"}


@pytest.fixture(scope="module")
def grader():
    with Grader(memory_mb=1024) as g:
        yield g


def solution(name: str) -> dict:
    return json.loads((ROOT / "solutions" / f"{name}.ipynb").read_text())


def write_nb(path: Path, cells: list[str]) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in cells])
    nbformat.write(nb, path)
    return path


def graded_part(nb: dict) -> dict:
    """The notebook without the code cells after its last solution cell and that cell's self-check: the experiments
    there (training runs, sweeps) are graded by no check, so tests of the graded functions need not run them."""
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    last = max(i for i, c in enumerate(code) if "### END SOLUTION" in "".join(c["source"]))
    keep = {id(c) for c in code[: last + 2]}
    nb["cells"] = [c for c in nb["cells"] if c["cell_type"] != "code" or id(c) in keep]
    return nb


def variant(tmp_path: Path, name: str, replacements: list[tuple], graded_only: bool = False) -> Path:
    """The solution notebook with (old, new[, count]) replacements in its code cells (old must occur count times);
    graded_only: only its graded part (`graded_part`)."""
    nb = solution(name)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for old, new, *count in replacements:
        srcs = ["".join(c["source"]) for c in code]
        found = sum(s.count(old) for s in srcs)
        assert found == (count[0] if count else 1), f"{old!r} occurs {found} times in solutions/{name}.ipynb"
        for c, s in zip(code, srcs):
            c["source"] = s.replace(old, new)
    nb = graded_part(nb) if graded_only else nb
    path = tmp_path / f"{name}.ipynb"
    path.write_text(json.dumps(nb))
    return path


def solution_cells(name: str, graded_only: bool = False) -> list[str]:
    nb = graded_part(solution(name)) if graded_only else solution(name)
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def assert_results_format(results: dict) -> None:
    """Gradescope's results.json: score, execution_time, output, tests[] with name/score/max_score/output/visibility."""
    assert isinstance(results["score"], float) and isinstance(results["execution_time"], int)
    assert isinstance(results["output"], str)
    for t in results["tests"]:
        assert {"name", "score", "max_score", "output", "visibility", "status"} <= set(t)
        assert isinstance(t["name"], str) and isinstance(t["output"], str) and t["visibility"] in VISIBILITY
        assert 0 <= t["score"] <= t["max_score"] and t["status"] in ("passed", "failed")
    assert results["score"] == pytest.approx(sum(t["score"] for t in results["tests"]))
    json.dumps(results)


def scores(results: dict) -> dict[str, float]:
    return {t["name"]: t["score"] for t in results["tests"]}


def failed(results: dict) -> list[str]:
    return [t["name"] for t in results["tests"] if t["score"] < t["max_score"]]


def checks_of(results: dict) -> list[dict]:
    """The graded entries (without the 0-point warning about cells that raise)."""
    return [t for t in results["tests"] if t["name"] != RUNS_CLEANLY]


def cell_warning(results: dict) -> dict:
    """The 0-point entry that says whether the notebook's own cells ran without errors (always the first)."""
    assert results["tests"][0]["name"] == RUNS_CLEANLY and results["tests"][0]["max_score"] == 0
    return results["tests"][0]


def graded_name(check_name: str, assignment: str) -> str:
    """The function or class a check grades: its name's first word (A5 grades one class, DiTBlock)."""
    return "DiTBlock" if assignment.startswith("A5") else re.split(r"[:( ]", check_name)[0]


def assert_known_wrong(results: dict, name: str, label: str, expected: str, phrase: str | None = None) -> None:
    """The mistake loses the expected check, with feedback (naming the mistake when `phrase` is given), and the
    notebook's own self-checks catch it too: a cell raises, and its error names the function to fix."""
    lost = failed(results)
    assert lost, f"{name}: '{label}' scored full marks"
    hit = [t for t in results["tests"] if t["name"].startswith(expected) and t["score"] < t["max_score"]]
    assert hit, f"{name}: '{label}' lost {lost}, not '{expected}…'"
    if phrase is not None:
        assert any(phrase in t["output"] for t in hit), f"{name}: '{label}': feedback {[t['output'] for t in hit]}"
    warning = cell_warning(results)
    assert warning["status"] == "failed", f"{name}: '{label}' passes every self-check of the notebook"
    who = graded_name(hit[0]["name"], name)
    first = warning["output"].split("\nIn [")[0]
    assert who in first, f"{name}: '{label}': the first failing cell does not name {who}: {first}"


# ---- non-vacuity ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_solution_scores_full_marks(grader, name):
    results = grader.grade(ROOT / "solutions" / f"{name}.ipynb")
    assert_results_format(results)
    assert failed(results) == [], json.dumps(results["tests"], indent=1)[:3000]
    assert results["score"] == sum(c.points for c in get_assignment(name).CHECKS) > 0
    assert cell_warning(results)["status"] == "passed", cell_warning(results)["output"]


@pytest.mark.parametrize("name", NAMES)
def test_untouched_exercise_scores_zero_on_every_check(grader, name):
    results = grader.grade(ROOT / "exercises" / f"{name}.ipynb")
    assert_results_format(results)
    assert all(t["score"] == 0 for t in results["tests"]), [t["name"] for t in results["tests"] if t["score"]]
    assert len(checks_of(results)) == len(get_assignment(name).CHECKS)
    assert cell_warning(results)["status"] == "failed"  # the stubs raise NotImplementedError in the self-checks


# Known-wrong implementations: the solution with one mistake put in, the check (name prefix) it must lose and,
# optionally, words its feedback must contain.
WRONG = {
    "A1_tokens": {
        "features in (channel, row, column) order": (
            [("x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, q, C)", "x.permute(0, 2, 4, 1, 3, 5)")],
            "patchify: (B"),
        "patches in column-major order": (
            [("x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, q, C)", "x.permute(0, 4, 2, 3, 5, 1)")],
            "patchify: non"),
        "no ValueError for indivisible sizes": (
            [("    if H % p or W % p:\n", "    if False:\n")],
            "patchify: raises"),
        "unpatchify swaps the grid axes": (
            [("x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, q)", "x.permute(0, 5, 2, 3, 1, 4)")],
            "unpatchify: non"),
        "row half first": (
            [("[emb_1d(t % grid_w), emb_1d(t // grid_w)]", "[emb_1d(t // grid_w), emb_1d(t % grid_w)]")],
            "sincos_2d: a 4"),
        "cos before sin": (
            [("[angles.sin(), angles.cos()]", "[angles.cos(), angles.sin()]")],
            "sincos_2d: a 4"),
        "square grids only": (
            [("    grid_w = grid_h if grid_w is None else grid_w\n", "    grid_w = grid_h\n")],
            "sincos_2d: non"),
    },
    "A2_adaln_zero": {
        "modulate without the 1 +": (
            [("return x * (1 + scale.unsqueeze(1))", "return x * scale.unsqueeze(1)")],
            "modulate"),
        "modulate broadcast over the batch": (
            [("return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)",
              "return x * (1 + scale.unsqueeze(0)) + shift.unsqueeze(0)")],
            "modulate"),
        "exact GELU": (
            [('        self.act = nn.GELU(approximate="tanh")\n', "        self.act = nn.GELU()\n")],
            "Mlp"),
        "affine LayerNorms": (
            [("nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)", "nn.LayerNorm(dim)", 2)],
            "DiTBlock: LayerNorms"),
        "chunk order (gate, shift, scale)": (
            [("        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp",
              "        gate_msa, shift_msa, scale_msa, gate_mlp, shift_mlp, scale_mlp")],
            "DiTBlock: with the package"),
        "no zero initialisation": (
            [("        nn.init.zeros_(self.adaLN_modulation[-1].weight)\n", "")],
            "DiTBlock: a freshly"),
        "MLP without its gate": (
            [("x = x + gate_mlp.unsqueeze(1) * self.mlp(", "x = x + self.mlp(")],
            "DiTBlock: with the package"),
        "zeroed output projections too": (
            [("        nn.init.zeros_(self.adaLN_modulation[-1].bias)\n",
              "        nn.init.zeros_(self.adaLN_modulation[-1].bias)\n"
              "        for zeroed in (self.attn.proj, self.mlp.fc2):\n"
              "            nn.init.zeros_(zeroed.weight)\n"
              "            nn.init.zeros_(zeroed.bias)\n")],
            "DiTBlock: its own"),
        "MLP width ignores mlp_ratio": (
            [("        self.mlp = Mlp(dim, int(dim * mlp_ratio))\n", "        self.mlp = Mlp(dim, 4 * dim)\n")],
            "DiTBlock: parameter names", "mlp_ratio = 2"),
    },
    "A3_attention": {
        "no 1/√d scaling": (
            [(" / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)", "  # (B, H, Tq, Tk)")],
            "scaled_dot_product_attention: output"),
        "scaled by 1/d": (
            [("math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)", "q.shape[-1]  # (B, H, Tq, Tk)")],
            "scaled_dot_product_attention: output"),
        "softmax over the queries": (
            [("weights = scores.softmax(dim=-1)", "weights = scores.softmax(dim=-2)")],
            "scaled_dot_product_attention: output"),
        "inverted mask": (
            [("masked_fill(~key_padding_mask[:, None, None, :]", "masked_fill(key_padding_mask[:, None, None, :]")],
            "scaled_dot_product_attention: key padding"),
        "heads split before q/k/v": (
            [("reshape(B, T, 3, self.num_heads, D // self.num_heads)  # (B, T, 3, H, d)",
              "reshape(B, T, self.num_heads, 3, D // self.num_heads)")],
            "MultiHeadSelfAttention: the"),
        "cross-attention ignores the mask": (
            [("out, _ = scaled_dot_product_attention(q, k, v, context_mask)",
              "out, _ = scaled_dot_product_attention(q, k, v)")],
            "CrossAttention: padded"),
    },
    "A4_rectified_flow": {
        "t = 0 is noise": (
            [("    return (1 - tb) * x0 + tb * noise\n", "    return tb * x0 + (1 - tb) * noise\n")],
            "interpolate"),
        "target x0 − noise": (
            [("    return F.mse_loss(model(x_t, t, y), noise - x0)\n",
              "    return F.mse_loss(model(x_t, t, y), x0 - noise)\n")],
            "velocity_loss"),
        "loss detached from the model": (
            [("    return F.mse_loss(model(x_t, t, y), noise - x0)\n",
              "    return F.mse_loss(model(x_t, t, y).detach(), noise - x0)\n")],
            "velocity_loss"),
        "sampling from t = 0 to 1": (
            [("ts = torch.linspace(1.0, 0.0, steps + 1)", "ts = torch.linspace(0.0, 1.0, steps + 1)")],
            "euler_sample: integrates"),
        "Euler step with the wrong sign": (
            [("        x = x + (t_next - t_cur) * velocity", "        x = x - (t_next - t_cur) * velocity")],
            "euler_sample: integrates"),
        "velocity evaluated at t_next": (
            [("velocity(x, t_cur.expand(x.shape[0]))", "velocity(x, t_next.expand(x.shape[0]))")],
            "euler_sample: one velocity call"),
        "guidance on 3 of 4 channels": (
            [("    return uncond + scale * (cond - uncond)\n",
              "    guided = uncond + scale * (cond - uncond)\n"
              "    return torch.cat([guided[:, :3], cond[:, 3:]], dim=1)\n")],
            "cfg_velocity: uncond"),
        "two separate forwards": (
            [("    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2B, …)\n"
              "    cond, uncond = out.chunk(2)\n",
              "    cond, uncond = model(x, t, y), model(x, t, null)\n")],
            "cfg_velocity: ONE", "expected one model call per guided prediction, got 2"),
        "guidance away from the condition": (
            [("    return uncond + scale * (cond - uncond)\n", "    return cond + scale * (uncond - cond)\n")],
            "cfg_velocity: uncond", "guidance points the wrong way"),
        # the mistakes that passed the old self-checks or the old grader
        "interpolate for 4-D images only": (
            [("    tb = t.reshape(-1, *[1] * (x0.ndim - 1))  # (B, 1, …)\n", "    tb = t.reshape(-1, 1, 1, 1)\n")],
            "interpolate: any shape", "expected shape (3, 5, 4)"),
        "loss computed under no_grad": (
            [("    x_t = interpolate(x0, noise, t)\n    return F.mse_loss(model(x_t, t, y), noise - x0)\n",
              "    with torch.no_grad():\n        x_t = interpolate(x0, noise, t)\n"
              "        return F.mse_loss(model(x_t, t, y), noise - x0)\n")],
            "velocity_loss: differentiable", "no graph back to the model"),
        "per-sample sum instead of the mean": (
            [("    return F.mse_loss(model(x_t, t, y), noise - x0)\n",
              "    return ((model(x_t, t, y) - (noise - x0)) ** 2).flatten(1).sum(1).mean()\n")],
            "velocity_loss: the mean", "a sum over each sample's values"),
        "t of shape (1,)": (
            [("velocity(x, t_cur.expand(x.shape[0]))", "velocity(x, t_cur.reshape(1))")],
            "euler_sample: one velocity call", "t must have one value per sample: expected shape (3,), got (1,)"),
        "interpolate with reversed time": (
            [("    return (1 - tb) * x0 + tb * noise\n", "    return tb * x0 + (1 - tb) * noise\n")],
            "interpolate: x_t", "yours is reversed"),
    },
    # The seed audit's defects (shared/seed-audit.md, "The seed's DiTBlock: defects"), one at a time.
    "A5_seed_bug_hunt": {
        "1 one context argument for both roles": (
            [("    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None,\n"
              "                context_mask: torch.Tensor | None = None) -> torch.Tensor:\n",
              "    def forward(self, x, context, context_mask=None):\n        c = context\n")],
            "forward(x, c, context)"),
        "2 cross-attention without kdim/vdim": (
            [("nn.MultiheadAttention(d_model, n_heads, kdim=context_dim, vdim=context_dim,\n"
              "                                                    batch_first=True)",
              "nn.MultiheadAttention(d_model, n_heads, batch_first=True)")],
            "cross-attention takes"),
        "3 the feed-forward re-applies adaLN_mod": (
            [("* self.mlp(modulate(self.norm3(x)", "* self.adaLN_mod(modulate(self.norm3(x)")],
            "a real MLP"),
        "4 MLP residual without gate": (
            [("x = x + gate_mlp.unsqueeze(1) * self.mlp(", "x = x + self.mlp(")],
            "gate_mlp = 0"),
        "5 MLP input without shift/scale": (
            [("self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))", "self.mlp(self.norm3(x))")],
            "shift, scale and gate"),
        "6 chunk order": (
            [("        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp =",
              "        gate_msa, shift_msa, scale_msa, gate_mlp, shift_mlp, scale_mlp =")],
            "with the package"),
        "7 no adaLN-Zero initialisation": (
            [("        nn.init.zeros_(self.adaLN_mod[-1].weight)  # adaLN-Zero: every gate starts at 0\n"
              "        nn.init.zeros_(self.adaLN_mod[-1].bias)\n", "")],
            "a fresh block"),
        "8 SiLU built in forward, on the tokens": (
            [("nn.Sequential(nn.SiLU(), nn.Linear(d_model, 6 * d_model))",
              "nn.Sequential(nn.Linear(d_model, 6 * d_model))"),
             ("self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))",
              "self.mlp(nn.SiLU()(modulate(self.norm3(x), shift_mlp, scale_mlp)))")],
            "SiLU is a registered"),
        "9 affine LayerNorms": (
            [("nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)", "nn.LayerNorm(d_model)", 3)],
            "LayerNorms are non-affine"),
        "10 no key padding mask": (
            [("key_padding_mask=ignore, ", "")],
            "padded context tokens"),
        "11 output projections zeroed too": (
            [("        nn.init.zeros_(self.adaLN_mod[-1].bias)\n",
              "        nn.init.zeros_(self.adaLN_mod[-1].bias)\n"
              "        for zeroed in (self.self_attn.out_proj, self.mlp[-1]):\n"
              "            nn.init.zeros_(zeroed.weight)\n"
              "            nn.init.zeros_(zeroed.bias)\n")],
            "at initialisation the adaLN"),
        # not a defect of the seed, but one a fix can introduce (the old grader missed it)
        "mlp_ratio ignored (always 4·d)": (
            [("        hidden = int(d_model * mlp_ratio)\n", "        hidden = 4 * d_model\n")],
            "mlp_ratio sets"),
    },
    "A8_joint_attention": {
        "two cross-attentions, no text→text / image→image": (
            [("    out = scores.softmax(dim=-1) @ v  # (B, H, L+T, d)\n",
              "    scores[:, :, :L, :L] = float('-inf')\n    scores[:, :, L:, L:] = float('-inf')\n"
              "    out = scores.softmax(dim=-1) @ v  # (B, H, L+T, d)\n")],
            "joint_attention: concatenate"),
        "text queries blind to image keys": (
            [("    out = scores.softmax(dim=-1) @ v  # (B, H, L+T, d)\n",
              "    scores[:, :, :L, L:] = float('-inf')\n    out = scores.softmax(dim=-1) @ v  # (B, H, L+T, d)\n")],
            "joint_attention: information flows both ways"),
        "a softmax per modality": (
            [("    out = scores.softmax(dim=-1) @ v  # (B, H, L+T, d)\n",
              "    w = torch.cat([scores[..., :L].softmax(-1), scores[..., L:].softmax(-1)], dim=-1) / 2\n"
              "    out = w @ v\n")],
            "joint_attention: concatenate"),
        "text padding mask ignored": (
            [('        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))\n', "")],
            "joint_attention: the text padding mask"),
        "no 1/sqrt(d) scaling": (
            [(" / math.sqrt(q.shape[-1])  # (B, H, L+T, L+T)", "  # (B, H, L+T, L+T)")],
            "joint_attention: concatenate"),
        "split at T instead of L": (
            [("    return out[:, :, :L], out[:, :, L:]\n", "    return out[:, :, :T], out[:, :, T:]\n")],
            "joint_attention: concatenate"),
        "one qkv for both modalities": (
            [("        q_t, k_t, v_t = heads(self.qkv_txt, txt)\n",
              "        q_t, k_t, v_t = heads(self.qkv_img, txt)\n")],
            "JointAttention: the package"),
        "qkv split as (heads, 3) instead of (3, heads)": (
            [("reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)",
              "reshape(B, N, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)")],
            "JointAttention: the package"),
        "QK-norm shared by the two modalities": (
            [("self.q_norm, self.k_norm, self.q_norm_txt, self.k_norm_txt = norm(), norm(), norm(), norm()",
              "self.q_norm, self.k_norm = norm(), norm()\n"
              "        self.q_norm_txt, self.k_norm_txt = self.q_norm, self.k_norm")],
            "JointAttention(qk_norm=True)"),
        "pre-only block keeps a text projection": (
            [("        self.proj_txt = None if pre_only else nn.Linear(dim, dim)\n",
              "        self.proj_txt = nn.Linear(dim, dim)\n"),
             ("        out_txt = None if self.pre_only else self.proj_txt(", "        out_txt = self.proj_txt(")],
            "JointAttention(pre_only=True)"),
    },
}
CASES = [(name, label) for name, wrongs in WRONG.items() for label in wrongs]


@pytest.mark.parametrize(("name", "label"), CASES, ids=[f"{n.split('_')[0]}-{lab}" for n, lab in CASES])
def test_known_wrong_implementation_fails(grader, tmp_path, name, label):
    replacements, expected, *phrase = WRONG[name][label]
    results = grader.grade(variant(tmp_path, name, replacements), assignment=name)
    assert_known_wrong(results, name, label, expected, *phrase)


def test_every_seed_defect_has_a_variant():
    """The seed audit lists 11 defects of the seed's DiTBlock; each is re-introduced above."""
    numbers = {label.split()[0] for label in WRONG["A5_seed_bug_hunt"] if label[0].isdigit()}
    assert numbers == {str(i) for i in range(1, 12)}


# ---- hostile and broken submissions (A1, with the solution's cells around the hostile ones) ---------------------
@pytest.fixture(scope="module")
def good():
    """The A1 solution's code cells: setup, patchify, unpatchify, sincos_2d (self-checks dropped)."""
    cells = solution_cells("A1_tokens")
    return [c for c in cells if c.startswith(("import", "def "))]


def _redefine(name: str, body: str) -> str:
    args = {"patchify": "x, p", "unpatchify": "tokens, p, channels, h=None, w=None"}[name]
    return f"def {name}({args}):\n" + "".join(f"    {line}\n" for line in body.splitlines())


def test_infinite_loop_in_a_cell_is_skipped(grader, tmp_path, good):
    nb = write_nb(tmp_path / "A1_tokens.ipynb", ["while True:\n    pass", *good])
    t0 = time.monotonic()
    results = grader.grade(nb, timeout=4)
    assert failed(results) == [] and "skipped" in results["output"]
    assert time.monotonic() - t0 < 60


def test_infinite_loop_in_a_checked_function(grader, tmp_path, good):
    nb = write_nb(tmp_path / "A1_tokens.ipynb", [*good, _redefine("patchify", "while True:\n    pass")])
    results = grader.grade(nb, check_timeout=2)
    lost = failed(results)
    assert lost == [c.name for c in get_assignment("A1").CHECKS if c.name.startswith("patchify")]
    assert all("timed out" in t["output"] for t in results["tests"] if t["name"] in lost)


def test_syntax_error_cell_does_not_stop_the_rest(grader, tmp_path, good):
    nb = write_nb(tmp_path / "A1_tokens.ipynb", ["def broken(:\n    pass", *good, "raise KeyboardInterrupt"])
    results = grader.grade(nb)
    assert failed(results) == [] and "SyntaxError" in results["output"] and "KeyboardInterrupt" in results["output"]


@pytest.mark.parametrize("content", [None, "{not json", '{"cells": 3}', "\x00\x01binary"])
def test_unreadable_or_missing_notebook(grader, tmp_path, content):
    path = tmp_path / "A1_tokens.ipynb"
    if content is not None:
        path.write_text(content)
    results = grader.grade(path)
    assert_results_format(results)
    assert results["score"] == 0 and len(checks_of(results)) == len(get_assignment("A1").CHECKS)
    assert all(t["output"].startswith("not graded") for t in checks_of(results))
    assert cell_warning(results)["status"] == "failed" and cell_warning(results)["output"].startswith("not run")


def test_exit_calls_in_cells_and_in_checks(grader, tmp_path, good):
    cells = ["import os\nos._exit(3)", "import sys\nsys.exit(1)", *good,
             _redefine("unpatchify", "import os\nos._exit(0)"), "exit()"]
    results = grader.grade(write_nb(tmp_path / "A1_tokens.ipynb", cells))
    assert_results_format(results)
    assert failed(results) == [c.name for c in get_assignment("A1").CHECKS if c.name.startswith("unpatchify")]
    assert "In [1]: this cell ended the notebook's process" in results["output"]
    assert "In [1]: this cell ended the notebook's process" in cell_warning(results)["output"]
    cells[-2] = _redefine("unpatchify", "import sys\nsys.exit(0)")
    results = grader.grade(write_nb(tmp_path / "A1_tokens.ipynb", cells))
    assert [t["output"].split(":")[0] for t in checks_of(results) if t["score"] == 0] == ["raised SystemExit"] * 3


def test_memory_hog_is_stopped(tmp_path, good):
    hog = "hog = []\nfor _ in range(24):\n    hog.append(torch.ones(1 << 26))  # 24 × 256 MB, touched"
    cells = [good[0], hog, "del hog", *good[1:], _redefine("patchify", hog + "\nreturn hog")]
    with Grader(memory_mb=512) as g:
        results = g.grade(write_nb(tmp_path / "A1_tokens.ipynb", cells))
    assert "In [2]: RuntimeError" in results["output"] and "can't allocate" in results["output"]
    lost = failed(results)
    assert lost == [c.name for c in get_assignment("A1").CHECKS if c.name.startswith("patchify")]


def test_printing_megabytes(grader, tmp_path, good):
    cells = ['print("x" * 30_000_000)', *good, "import sys\nfor _ in range(20):\n    sys.stderr.write('y' * 1_000_000)"]
    spam = _redefine("patchify", 'print("z" * 5_000_000)\nreturn PATCHIFY(x, p)')
    cells += [good[1].replace("def patchify(", "def PATCHIFY("), spam]
    results = grader.grade(write_nb(tmp_path / "A1_tokens.ipynb", cells))
    assert failed(results) == [] and len(json.dumps(results)) < 100_000


def test_results_file_cannot_be_overwritten(grader, tmp_path, good):
    out = tmp_path / "results" / "results.json"
    out.parent.mkdir()
    forged = '{"score": 1000, "tests": []}'
    writer = f"open({str(out)!r}, 'w').write({forged!r})"
    daemon = (f"import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(3)\n"
              f"        {writer}\n        os._exit(0)\n    os._exit(0)")
    cells = [writer, daemon, *good, _redefine("patchify", f"{writer}\nraise RuntimeError('no')")]
    results = grader.grade(write_nb(tmp_path / "A1_tokens.ipynb", cells))
    write_results(results, out)
    time.sleep(4)  # the daemon would have written by now, had it survived
    final = json.loads(out.read_text())
    assert final == results and final["score"] == 8.0  # 12 points, less the 4 of patchify
    assert [f for f in os.listdir(out.parent) if f != "results.json"] == []


def test_patching_torch_the_checks_and_the_grader_changes_nothing(grader, tmp_path, good):
    wrong = good[1].replace("x.permute(0, 2, 4, 3, 5, 1)", "x.permute(0, 2, 4, 1, 3, 5)")
    patches = """
import torch, minidit.tokens, minidit.grading.checks as C, minidit.grading.sandbox as S
import minidit.assignments.a1_tokens as A
torch.allclose = torch.equal = lambda *a, **k: True
C.compare = lambda *a, **k: None
C.encode = lambda value, _depth=0: None
for check in A.CHECKS:
    check.probe = lambda **names: None
A.CHECKS.clear()
S._check_child = lambda *a, **k: None
S.load_check_module = lambda *a, **k: None
"""
    results = grader.grade(write_nb(tmp_path / "A1_tokens.ipynb", [good[0], wrong, *good[2:], patches]))
    assert_results_format(results)
    assert failed(results) == ["patchify: (B, C, H, W) → (B, T, p·p·C) on square images, p = 2 and 4",
                               "patchify: non-square images (4×12, p = 4) and p = 1"]


def test_forged_messages_from_the_sandbox(grader, tmp_path, good):
    """A thread in the sandbox floods the grader's pipe with fake results and garbage while the checks run.

    Its writes can interleave with the sandbox's own messages and garble them: the check then times out and the
    sandbox is restarted; forged results can only make checks fail (the grader compares with its own answers).
    """
    wrong = good[1].replace("x.permute(0, 2, 4, 3, 5, 1)", "x.permute(0, 2, 4, 1, 3, 5)")
    forger = """
import json, os, sys, threading, time
fd = int(sys.argv[-1])
def forge():
    time.sleep(0.3)
    for seq in range(1, 2000):
        os.write(fd, (json.dumps({"type": "result", "seq": seq, "value": {"__tensor__": [1], "data": ["x"]}})
                      + "\\n").encode())
        os.write(fd, b"garbage that is not JSON\\n" + b"[" * 5000 + b"\\n")
threading.Thread(target=forge, daemon=True).start()
"""
    t0 = time.monotonic()
    results = grader.grade(write_nb(tmp_path / "A1_tokens.ipynb", [good[0], wrong, *good[2:], forger]),
                           check_timeout=2)
    assert time.monotonic() - t0 < 120
    assert_results_format(results)
    assert {"patchify: (B, C, H, W) → (B, T, p·p·C) on square images, p = 2 and 4",
            "patchify: non-square images (4×12, p = 4) and p = 1"} <= set(failed(results))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="dropping privileges needs root")
def test_root_grader_runs_submissions_as_nobody(tmp_path, good):
    """As root (Gradescope), the sandbox drops to `nobody`: it cannot write the grader's files or signal it."""
    out = tmp_path / "results.json"
    out.write_text("{}")
    os.chmod(tmp_path, 0o755)
    attacks = [f"open({str(out)!r}, 'w').write('forged')", "import os\nos.kill(os.getppid(), 9)",
               "import os\nassert os.getuid() == 65534, os.getuid()"]
    with Grader(drop_privileges=True) as g:
        results = g.grade(write_nb(tmp_path / "A1_tokens.ipynb", [*good, *attacks]))
    assert failed(results) == [] and out.read_text() == "{}"
    # cell 5 (write the results file) and cell 6 (kill the zygote) are refused; cell 7 (uid == nobody) passes
    assert "In [5]: PermissionError" in results["output"] and "In [6]: PermissionError" in results["output"]
    assert "In [7]:" not in results["output"]  # no error listed for cell 7


def test_names_imported_from_the_package_are_refused(grader, tmp_path, good):
    cells = [*good, "from minidit.tokens import patchify, sincos_2d"]
    results = grader.grade(write_nb(tmp_path / "A1_tokens.ipynb", cells))
    lost = failed(results)
    assert lost and all(n.startswith(("patchify", "sincos_2d")) for n in lost)
    assert "comes from the module `minidit.tokens`" in checks_of(results)[0]["output"]


def test_missing_names_are_reported(grader, tmp_path):
    results = grader.grade(write_nb(tmp_path / "a1.ipynb", ["x = 1"]))
    assert results["score"] == 0 and "`patchify` is not defined" in checks_of(results)[0]["output"]


# ---- hidden tests, the CLI, the autograder zip -----------------------------------------------------------------
HIDDEN = '''
import torch
from minidit.grading import Check
ASSIGNMENT = "A1_tokens"
RAMP = [[[0., 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]]
CHECKS = [Check("hidden: patchify of a 1×1×4×4 ramp", points=2, visibility="after_published",
                probe=lambda patchify: patchify(torch.arange(16.).reshape(1, 1, 4, 4), 2),
                expect=lambda: torch.tensor(RAMP))]
'''


@pytest.fixture()
def hidden_dir(tmp_path):
    d = tmp_path / "hidden"
    d.mkdir()
    (d / "extra_a1.py").write_text(HIDDEN)
    (d / "other.py").write_text(HIDDEN.replace('ASSIGNMENT = "A1_tokens"', 'ASSIGNMENT = "A2"'))
    return d


def test_hidden_tests(grader, tmp_path, hidden_dir):
    results = grader.grade(ROOT / "solutions" / "A1_tokens.ipynb", tests_dir=hidden_dir)
    hidden = [t for t in results["tests"] if t["name"].startswith("hidden")]
    assert len(hidden) == 1 and hidden[0]["visibility"] == "after_published" and hidden[0]["score"] == 2
    assert results["score"] == 14
    wrong = variant(tmp_path, "A1_tokens", WRONG["A1_tokens"]["patches in column-major order"][0])
    assert "hidden: patchify of a 1×1×4×4 ramp" in failed(grader.grade(wrong, tests_dir=hidden_dir))
    (hidden_dir / "broken.py").write_text("CHECKS = [1, 2]")
    with pytest.raises(GradingError, match="CHECKS must be a list"):
        grader.grade(ROOT / "solutions" / "A1_tokens.ipynb", tests_dir=hidden_dir)


def _cli(*args, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "minidit.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_cli_grade_writes_results_and_table(tmp_path):
    out = tmp_path / "r" / "results.json"
    r = _cli("grade", ROOT / "exercises" / "A3_attention.ipynb", "--json", out, "--timeout", "60")
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())
    assert_results_format(results)
    assert results["score"] == 0 and "total (A3_attention" in r.stdout
    r = _cli("grade", tmp_path / "mystery.ipynb", "--json", out)
    assert r.returncode == 2 and "pass --assignment" in r.stderr
    assert json.loads(out.read_text())["score"] == 0


def test_autograder_zip(tmp_path, hidden_dir):
    z = build_autograder("A1", tmp_path / "a1.zip", ROOT, tests_dir=hidden_dir, timeout=120)
    with zipfile.ZipFile(z) as f:
        names = set(f.namelist())
        run = f.read("run_autograder").decode()
        setup = f.read("setup.sh").decode()
        modes = {n: f.getinfo(n).external_attr >> 16 for n in ("setup.sh", "run_autograder")}
        f.extractall(tmp_path / "source")
    assert {"setup.sh", "run_autograder", "requirements/constraints.txt", "minidit-src/pyproject.toml",
            "minidit-src/minidit/grading/grader.py", "minidit-src/minidit/assignments/a1_tokens.py",
            "hidden_tests/extra_a1.py", "hidden_tests/other.py"} <= names
    assert not any("__pycache__" in n for n in names)
    assert all(m & stat.S_IXUSR for m in modes.values())
    assert "torch==2.14.1" in setup and "-c requirements/constraints.txt ./minidit-src" in setup
    assert "--assignment A1_tokens" in run and "/results/results.json" in run
    # Run run_autograder as Gradescope would, under a local AUTOGRADER_ROOT, with this environment's python3.
    root = tmp_path / "autograder"
    (root / "submission").mkdir(parents=True)
    (root / "submission" / "my_work.ipynb").write_bytes((ROOT / "solutions" / "A1_tokens.ipynb").read_bytes())
    os.symlink(tmp_path / "source", root / "source")
    env = {**os.environ, "AUTOGRADER_ROOT": str(root), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(tmp_path / "source" / "run_autograder")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((root / "results" / "results.json").read_text())
    assert_results_format(results)
    assert results["score"] == 14 and failed(results) == []


# ---- units: exercises, wire format, comparisons, names ---------------------------------------------------------
def test_exercise_code_replaces_blocks_with_hints():
    src = ("def f(x):\n    \"\"\"Doc.\"\"\"\n    ### BEGIN SOLUTION\n"
           "    # HINT: add one,\n    # HINT: then \"return\".\n"
           "    return x + 1\n    ### END SOLUTION\n\n\n### BEGIN SOLUTION\ny = f(1)\n### END SOLUTION\nprint(2)")
    out = exercise_code(src)
    assert out == ("def f(x):\n    \"\"\"Doc.\"\"\"\n    # YOUR CODE HERE\n"
                   "    raise NotImplementedError(\"add one, then \\\"return\\\".\")\n\n\n"
                   "# YOUR CODE HERE\nraise NotImplementedError(\"write this part (see the instructions above)\")\n"
                   "print(2)")
    assert exercise_code("a = 1\n") == "a = 1\n"


def test_exercise_region_gives_the_starting_code():
    src = ("### BEGIN EXERCISE\n#> def f(x):\n#>     return x - 1  # the bug\n#>\n### END EXERCISE\n"
           "### BEGIN SOLUTION\ndef f(x):\n    return x + 1\n### END SOLUTION\n")
    assert exercise_code(src) == "def f(x):\n    return x - 1  # the bug\n\n"
    ns = {}
    exec(src, ns)  # in the solution notebook the region is only comments
    assert ns["f"](1) == 2


@pytest.mark.parametrize("src", ["### BEGIN SOLUTION\nx = 1\n", "x = 1\n### END SOLUTION\n",
                                 "### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n",
                                 "### BEGIN EXERCISE\n#> x = 1\n### END EXERCISE\nx = 2\n",
                                 "### BEGIN EXERCISE\nx = 1\n### END EXERCISE\n### BEGIN SOLUTION\n### END SOLUTION\n"])
def test_malformed_markers_are_errors(src):
    with pytest.raises(ExerciseError):
        exercise_code(src)


def test_make_exercise_clears_outputs_and_markdown_answers(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("Why?\n### BEGIN SOLUTION\nBecause.\n### END SOLUTION\n"),
        nbformat.v4.new_code_cell("def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION\n",
                                  execution_count=1, outputs=[nbformat.v4.new_output("stream", text="1\n")],
                                  metadata={"tags": ["keep"], "execution": {"iopub.status.busy": "x"}})])
    ex = make_exercise(nb)
    assert ex.cells[0].source == "Why?\n*Your answer here.*\n" and "Because" not in json.dumps(ex)
    code = ex.cells[1]
    assert code.outputs == [] and code.execution_count is None and code.metadata == {"tags": ["keep"]}
    assert nb.cells[1].outputs  # the solution is untouched
    bad_cell = nbformat.v4.new_code_cell("if x:\n### BEGIN SOLUTION\n    y = 1\n### END SOLUTION\n")
    bad = nbformat.v4.new_notebook(cells=[bad_cell])
    with pytest.raises(ExerciseError, match="does not compile"):
        make_exercise(bad)
    sol, exd = tmp_path / "solutions", tmp_path / "exercises"
    sol.mkdir()
    nbformat.write(nb, sol / "A9_x.ipynb")
    assert make_exercises(sol, exd, check=True) == [str(exd / "A9_x.ipynb")]
    assert make_exercises(sol, exd) == [str(exd / "A9_x.ipynb")]
    assert make_exercises(sol, exd, check=True) == []
    (exd / "orphan.ipynb").write_text("{}")
    assert make_exercises(sol, exd, check=True) == [str(exd / "orphan.ipynb")]
    make_exercises(sol, exd)
    assert not (exd / "orphan.ipynb").exists()


def test_wire_format_round_trip_and_validation():
    value = {"t": torch.arange(6.0).reshape(2, 3), "m": torch.tensor([True, False]), "n": [1, 2.5, "s", None],
             "o": object()}
    back = decode(json.loads(json.dumps(encode(value))))
    assert torch.equal(back["t"], value["t"].double()) and torch.equal(back["m"], value["m"])
    assert back["n"] == [1, 2.5, "s", None] and isinstance(back["o"], Opaque)
    for bad in [{"__tensor__": [2, 2], "data": [1, 2, 3]}, {"__tensor__": [-1], "data": []},
                {"__tensor__": [1], "dtype": "float32", "data": ["x"]}, {"weird": 1}]:
        with pytest.raises(ProtocolError):
            decode(bad)


def test_compare_explains_differences():
    want = torch.zeros(2, 3)
    assert compare(torch.zeros(2, 3), want) is None
    assert "expected shape (2, 3)" in compare(torch.zeros(3, 2), want)
    assert "first at index (1, 2)" in compare(torch.tensor([[0.0, 0, 0], [0, 0, 1]]), want)
    assert "NaN" in compare(torch.full((2, 3), float("nan")), want)
    assert "expected a tensor" in compare(Opaque("ndarray", ""), want)
    assert compare({"a": [1.0, 2]}, {"a": [1.0 + 1e-7, 2]}) is None and compare([1], [1, 2]) is not None
    with pytest.raises(ValueError):
        Check("x", points=1, probe=lambda f: f, visibility="sometimes", expect=lambda: 1)


def test_assignment_names():
    assert resolve_name("a3") == "A3_attention" and resolve_name("A5_seed_bug_hunt") == "A5_seed_bug_hunt"
    assert for_notebook("submissions/a2-jane.ipynb") == "A2_adaln_zero" and for_notebook("A99.ipynb") is None
    assert resolve_name("A9") == "A9_guidance" and resolve_name("a10") == "A10_reflow"
    assert resolve_name("A1") == "A1_tokens"  # not A10 or A11
    assert resolve_name("A99") is None


def test_find_notebook_in_a_submission_folder(tmp_path):
    from minidit.grading.grader import NotebookError, find_notebook

    with pytest.raises(NotebookError, match="found 0"):
        find_notebook(tmp_path)
    (tmp_path / "work.ipynb").write_text("{}")
    assert find_notebook(tmp_path) == tmp_path / "work.ipynb"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "A2_adaln_zero.ipynb").write_text("{}")
    with pytest.raises(NotebookError, match="found 2"):
        find_notebook(tmp_path)
    assert find_notebook(tmp_path, "A2_adaln_zero") == tmp_path / "sub" / "A2_adaln_zero.ipynb"


def test_a5_exercise_starts_from_the_seed_block_verbatim():
    """The exercise's DiTBlock is the SEED_BLOCK the notebook shows (the seed's code, indentation restored)."""
    cells = ["".join(c["source"]) for c in json.loads((ROOT / "exercises" / "A5_seed_bug_hunt.ipynb").read_text())
             ["cells"] if c["cell_type"] == "code"]
    block = next(c for c in cells if c.startswith("class DiTBlock"))
    seed = next(c for c in cells if "SEED_BLOCK = '''" in c).split("'''")[1]
    assert block.strip() == seed.strip()
    assert "self.adaLN_mod(nn.SiLU()(self.norm3(x)))" in block and "def forward(self, x, context):" in block
