"""Assessment: a submission that delegates to the package's implementation of what it must write scores 0 on those
checks (however it reaches it), and the new assignments (A9 guidance, A10 reflow) catch their known-wrong
implementations with feedback that names them — and their own self-checks catch them too.

Full marks for the solutions and 0 for the exercises are tested for every assignment in tests/test_grading.py.
"""

import pytest
import torch
from test_grading import assert_known_wrong, solution_cells, variant, write_nb

from minidit.assignments import a10_reflow, get_assignment
from minidit.grading import Grader


@pytest.fixture(scope="module")
def grader():
    with Grader(memory_mb=1024) as g:
        yield g


# ---- no shortcut to the reference -----------------------------------------------------------------------------
# Per assignment: a cell appended after the solution's cells that redefines the graded functions as thin wrappers
# around the package's versions, and the functions (check-name prefixes) that must then score 0.
WRAPPERS = {
    "A1_tokens": ("""
import minidit.tokens as ref
def patchify(x, p):
    return ref.patchify(x, p)
def unpatchify(tokens, p, channels, h=None, w=None):
    return ref.unpatchify(tokens, p, channels, h, w)
def sincos_2d(dim, grid_h, grid_w=None):
    return ref.sincos_2d(dim, grid_h, grid_w)
""", ("patchify", "unpatchify", "sincos_2d")),
    "A2_adaln_zero": ("""
import minidit.models as ref
def modulate(x, shift, scale):
    return ref.modulate(x, shift, scale)
class Mlp(ref.Mlp):
    pass
class DiTBlock(ref.DiTBlock):
    pass
""", ("modulate", "Mlp", "DiTBlock: a fresh", "DiTBlock: with", "DiTBlock: from", "DiTBlock: its own")),
    "A3_attention": ("""
from minidit.attention import attention as _attention, Attention as _Attention, CrossAttention as _Cross
def scaled_dot_product_attention(q, k, v, key_padding_mask=None):
    return _attention(q, k, v, key_padding_mask, return_weights=True)
class MultiHeadSelfAttention(_Attention):
    pass
class CrossAttention(_Cross):
    pass
""", ("scaled_dot_product_attention", "MultiHeadSelfAttention", "CrossAttention")),
    "A4_rectified_flow": ("""
import minidit.flow as ref
from minidit.guidance import guided as _guided
def interpolate(x0, noise, t):
    return ref.interpolate(x0, noise, t)
def velocity_loss(model, x0, y, t, noise):
    return ref.flow_loss(model, x0, y, t, noise)
def euler_sample(velocity, noise, steps):
    return ref.euler_sample(velocity, noise, steps)
def cfg_velocity(model, x, t, y, scale, null_label):
    return _guided(model, y, scale)(x, t)
""", ("interpolate", "velocity_loss", "euler_sample", "cfg_velocity")),
    "A6_vae": ("""
import minidit.vae as ref
def reparameterize(mean, logvar, noise=None):
    return ref.reparameterize(mean, logvar, noise)
def kl_divergence(mean, logvar):
    return ref.kl_divergence(mean, logvar)
""", ("reparameterize", "kl_divergence")),
    "A7_ddpm": ("""
import minidit.ddpm as ref
def alphas_cumprod(betas):
    return ref.DDPMSchedule("linear", len(betas)).alphas_cumprod
def q_sample(alphas_cumprod, x0, k, noise):
    return ref.q_sample(ref.DDPMSchedule("linear", len(alphas_cumprod)), x0, k, noise)
def ddim_step(x, eps, a_t, a_prev):
    return a_prev ** 0.5 * ref.predict_x0(x, eps, a_t) + (1 - a_prev) ** 0.5 * eps
""", ("alphas_cumprod", "q_sample", "ddim_step", "ddim_sample")),  # ddim_sample calls the wrapped ddim_step
    "A8_joint_attention": ("""
from minidit import mmdit
joint_attention = lambda *args, **kwargs: mmdit.joint_attention(*args, **kwargs)
class JointAttention(mmdit.JointAttention):
    pass
""", ("joint_attention", "JointAttention")),
    "A9_guidance": ("""
from minidit.guidance import guided
from minidit.sampling import sample
from minidit.metrics import accuracy, load_classifier
def guided_velocity(model, y, scale, interval=None):
    return guided(model, y, scale, interval)
def class_accuracy(images, labels):
    return accuracy(load_classifier(), images.clamp(-1, 1), labels)
""", ("guided_velocity", "class_accuracy", "sample_guided", "guidance_sweep")),  # these two call the wrapped ones
}


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_a_thin_wrapper_around_the_package_scores_zero(grader, tmp_path, name):
    source, wrapped = WRAPPERS[name]
    cells = [*solution_cells(name, graded_only=True), source]  # the graded part, then the wrapper
    results = grader.grade(write_nb(tmp_path / f"{name}.ipynb", cells), assignment=name)
    graded = [t for t in results["tests"] if t["name"].startswith(wrapped)]
    assert graded, f"{name}: no check grades {wrapped}"
    assert [t["name"] for t in graded if t["score"] > 0] == [], f"{name}: a wrapper around the package scored points"
    assert any("is switched off while the grader runs this check" in t["output"] for t in graded)
    others = [t for t in results["tests"] if t not in graded and t["max_score"] > 0]
    assert all(t["score"] == t["max_score"] for t in others), [t["name"] for t in others if t["score"] < t["max_score"]]


def test_every_assignment_with_a_package_reference_is_covered():
    """A10 has no package implementation to delegate to (its DISABLED is empty); every other course assignment is
    tried above. (Assignments added later, such as A11, bring their own tests.)"""
    mine = {f"A{i}" for i in range(1, 11)}
    assert {n.split("_")[0] for n in WRAPPERS} == mine - {"A5", "A10"} and not a10_reflow.DISABLED
    assert get_assignment("A5").DISABLED == ["minidit.models:DiTBlock.forward"]  # A5's wrapper: see below


def test_the_package_reached_every_way_scores_zero(grader, tmp_path):
    """A4's interpolate reaching the package's function through an import inside the function, a from-import alias,
    a bound default argument, and a function built on the package's very code object."""
    ways = {
        "import inside": "def interpolate(x0, noise, t):\n    import minidit.flow as ref\n"
                         "    return ref.interpolate(x0, noise, t)",
        "alias": "from minidit.flow import interpolate as f\ndef interpolate(x0, noise, t):\n"
                 "    return f(x0, noise, t)",
        "default argument": "import minidit.flow\ndef interpolate(x0, noise, t, f=minidit.flow.interpolate):\n"
                            "    return f(x0, noise, t)",
        "code object": "import types, minidit.flow\n"
                       "interpolate = types.FunctionType(minidit.flow.interpolate.__code__, globals(), 'interpolate')",
    }
    for way, source in ways.items():
        results = grader.grade(write_nb(tmp_path / "A4_rectified_flow.ipynb", [*solution_cells("A4_rectified_flow"),
                                                                              source]))
        lost = [t for t in results["tests"] if t["name"].startswith("interpolate")]
        assert lost and all(t["score"] == 0 for t in lost), (way, [t["output"] for t in lost])


def test_a5_block_wrapping_the_package_block_scores_zero(grader, tmp_path):
    """A fixed seed block whose forward hands the work to a package DiTBlock it keeps inside."""
    wrapper = '''
import minidit.models as ref
_Fixed = DiTBlock
class DiTBlock(_Fixed):
    def __init__(self, d_model, n_heads, context_dim=None, mlp_ratio=4.0):
        super().__init__(d_model, n_heads, context_dim, mlp_ratio)
        self._inner = ref.DiTBlock(d_model, n_heads, context_dim=context_dim, mlp_ratio=mlp_ratio)
    def forward(self, x, c, context=None, context_mask=None):
        return self._inner(x, c, context, context_mask)
'''
    cells = [*solution_cells("A5_seed_bug_hunt"), wrapper]
    results = grader.grade(write_nb(tmp_path / "A5_seed_bug_hunt.ipynb", cells))
    graded = [t for t in results["tests"] if t["max_score"] > 0]
    shapes = graded[0]
    assert shapes["score"] == 0 and "switched off" in shapes["output"]
    assert results["score"] <= 2  # at most the checks that only inspect modules (SiLU, LayerNorms) remain


# ---- A9 and A10: known-wrong implementations -------------------------------------------------------------------
WRONG = {
    "A9_guidance": {
        "two forward passes": (
            [("        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)\n",
              "        cond, uncond = model(x, t, y), model(x, t, null)\n")],
            "guided_velocity: ONE", "expected one model call per guided prediction, got 2"),
        "guidance outside the interval": (
            [("        outside = interval is not None and not interval[0] <= float(t[0]) <= interval[1]\n",
              "        outside = interval is not None and interval[0] <= float(t[0]) <= interval[1]\n")],
            "guided_velocity: the interval", "outside the interval instead of inside"),
        "interval ends excluded": (
            [("        outside = interval is not None and not interval[0] <= float(t[0]) <= interval[1]\n",
              "        outside = interval is not None and not interval[0] < float(t[0]) < interval[1]\n")],
            "guided_velocity: the interval", "ends are excluded"),
        "unconditional outside the interval": (
            [("        if scale == 1.0 or outside:\n            return model(x, t, y)\n",
              "        if scale == 1.0:\n            return model(x, t, y)\n        if outside:\n"
              "            return model(x, t, null)\n")],
            "guided_velocity: the interval", "plain conditional one"),
        "both halves computed even when guidance is off": (
            [("        if scale == 1.0 or outside:\n            return model(x, t, y)\n"
              "        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)\n",
              "        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)\n"
              "        if scale == 1.0 or outside:\n            return cond\n")],
            "guided_velocity: outside the interval and at scale 1", "wasted work"),
        "the shift ignored": (
            [("    ts, x = timesteps(steps, shift), noise\n", "    ts, x = timesteps(steps), noise\n")],
            "sample_guided: Euler"),
        "velocity at the end of each step": (
            [("        x = x + (t_next - t_cur) * velocity(x, t_cur.expand(x.shape[0]))\n",
              "        x = x + (t_next - t_cur) * velocity(x, t_next.expand(x.shape[0]))\n")],
            "sample_guided: one model call"),
        "no clamp before the classifier": (
            [("        predicted = classifier(images.clamp(-1, 1)).argmax(dim=1)\n",
              "        predicted = classifier(images).argmax(dim=1)\n")],
            "class_accuracy", "clamped to [−1, 1]"),
        "fresh noise for every scale": (
            [("    return {s: class_accuracy(sample_guided(model, labels, noise, steps, s, interval, shift), labels) "
              "for s in scales}\n",
              "    return {s: class_accuracy(sample_guided(model, labels, torch.randn_like(noise), steps, s, interval, "
              "shift), labels) for s in scales}\n")],
            "guidance_sweep: every scale", "from the same noise"),
    },
    "A10_reflow": {
        "the velocity's sign flipped": (
            [("    return (w * (eps - x0)).sum(1)\n", "    return (w * (x0 - eps)).sum(1)\n")],
            "exact_velocity: a mixture", "the sign is flipped"),
        "components weighted equally": (
            [("    w = torch.softmax(logits, dim=1)  # (B, K, 1): p(k | x_t)\n",
              "    w = torch.full_like(logits, 1 / means.shape[0])\n")],
            "exact_velocity: a mixture", "weight 1/K"),
        "the components' spread forgotten": (
            [("    var = (1 - tb) ** 2 * sigma**2 + tb**2  # Var[x_t | k] per coordinate\n",
              "    var = tb**2 + 0 * sigma\n")],
            "exact_velocity: a mixture", "spread σ"),
        "weights that overflow far away": (
            [("    w = torch.softmax(logits, dim=1)  # (B, K, 1): p(k | x_t)\n",
              "    w = logits.exp() / logits.exp().sum(1, keepdim=True)\n")],
            "exact_velocity: finite"),
        "straight line from the first velocity": (
            [("    line = noise - x  # the straight path's velocity: where the sample started minus where it ended\n",
              "    line = velocities[0]\n")],
            "straightness: mean", "noise − x_final"),
        "straightness with the velocity at each step's end": (
            [("        v = velocity(x, t_cur.expand(x.shape[0]))\n",
              "        v = velocity(x, t_next.expand(x.shape[0]))\n")],
            "straightness: one velocity call", "at its end instead of its start"),
        "pairs in the order (noise, x0)": (
            [("    return x.detach(), noise\n", "    return noise, x.detach()\n")],
            "reflow_pairs: (x0, noise)", "wrong order"),
        "pairs with fresh noise": (
            [("    return x.detach(), noise\n", "    return x.detach(), torch.randn_like(noise)\n")],
            "reflow_pairs: (x0, noise)", "the very noise"),
        "pairs that keep the graph": (
            [("    return x.detach(), noise\n", "    return x, noise\n")],
            "reflow_pairs: the pairs carry no"),
    },
}
CASES = [(name, label) for name, wrongs in WRONG.items() for label in wrongs]


@pytest.mark.parametrize(("name", "label"), CASES, ids=[f"{n.split('_')[0]}-{lab}" for n, lab in CASES])
def test_known_wrong_implementation_fails(grader, tmp_path, name, label):
    replacements, expected, *phrase = WRONG[name][label]
    results = grader.grade(variant(tmp_path, name, replacements, graded_only=True), assignment=name)
    assert_known_wrong(results, name, label, expected, *phrase)


def test_a10_reference_field_matches_a_brute_force_posterior():
    """The exact velocity of a mixture, E[noise − x0 | x_t], against a Monte Carlo estimate from joint samples."""
    g = torch.Generator().manual_seed(0)
    means, sigma, t = a10_reflow.MEANS, 0.4, 0.6
    n = 4_000_000  # x_t has density ≈ 0.138 at the point: ≈ 4300 samples fall in the ball of radius 0.05
    x0 = means[torch.randint(0, 3, (n,), generator=g)] + sigma * torch.randn(n, 2, generator=g)
    noise = torch.randn(n, 2, generator=g)
    xt = (1 - t) * x0 + t * noise
    point = torch.tensor([[0.3, 0.2]])
    near = (xt - point).norm(dim=1) < 0.05  # samples whose x_t falls next to the point
    brute = (noise - x0)[near].mean(0)
    exact = a10_reflow.mixture_velocity(point, torch.tensor([t]), means, sigma)[0]
    # the Monte Carlo mean has a standard error of ≈ 0.04 per coordinate with 4000 samples: 0.12 is 3 of them
    assert near.sum() > 4000 and torch.allclose(exact, brute, atol=0.12), (exact, brute, int(near.sum()))
    # a constant field is perfectly straight (0 up to float rounding); a rotation is not (seeded noise: S ≈ 0.5)
    noise = torch.randn(5, 2, generator=g)
    assert a10_reflow.straightness_reference(lambda x, t: torch.ones_like(x), noise, 4) < 1e-10
    assert a10_reflow.straightness_reference(a10_reflow._rotation, noise, 4) > 0.1
