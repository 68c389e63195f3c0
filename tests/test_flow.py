"""Rectified flow (minidit.flow), classifier-free guidance (minidit.guidance) and the one sampling loop
(minidit.sampling)."""

import pytest
import torch

from minidit import flow
from minidit.ddpm import DDPMSchedule, ddpm_solve
from minidit.guidance import check_guidance, guided, inputs_of
from minidit.models import DiT, DiTConfig
from minidit.sampling import SAMPLERS, sample


# ---- flow ----------------------------------------------------------------------------------------------------
def test_interpolation_endpoints_and_target():
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    assert torch.equal(flow.interpolate(x0, eps, torch.zeros(3)), x0)
    assert torch.equal(flow.interpolate(x0, eps, torch.ones(3)), eps)
    t = torch.tensor([0.1, 0.5, 0.9])
    xt = flow.interpolate(x0, eps, t)
    dt = 1e-3
    v_fd = (flow.interpolate(x0, eps, t + dt) - xt) / dt  # dx_t/dt = ε − x0
    assert torch.allclose(v_fd, eps - x0, atol=1e-3)


class Oracle(torch.nn.Module):
    """Knows x0 and ε, returns the exact velocity target: its loss must be exactly 0."""

    def __init__(self, x0, eps):
        super().__init__()
        self.x0, self.eps = x0, eps
        self.seen = []

    def forward(self, x, t, y):
        self.seen.append((x, t, y))
        return self.eps - self.x0


def test_flow_loss_is_zero_for_the_true_velocity_and_positive_otherwise():
    x0, eps = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    t, y = torch.rand(4), torch.tensor([0, 1, 2, 10])
    oracle = Oracle(x0, eps)
    assert flow.flow_loss(oracle, x0, y, t, eps) == 0
    x, t_seen, y_seen = oracle.seen[0]  # the model sees x_t, t and the labels as given
    assert torch.equal(x, flow.interpolate(x0, eps, t)) and torch.equal(t_seen, t) and torch.equal(y_seen, y)
    wrong = Oracle(x0, -eps)
    assert flow.flow_loss(wrong, x0, y, t, eps).item() == pytest.approx((4 * eps**2).mean().item(), rel=1e-5)


def test_flow_loss_draws_t_and_noise_when_not_given():
    x0 = torch.randn(64, 1, 2, 2)
    oracle = Oracle(x0, torch.zeros_like(x0))
    loss = flow.flow_loss(oracle, x0, torch.zeros(64, dtype=torch.long))
    _, t, _ = oracle.seen[0]
    assert t.shape == (64,) and 0 < t.min() and t.max() < 1 and loss > 0


@pytest.mark.parametrize("channels", [1, 4])
def test_flow_loss_refuses_a_model_whose_output_is_not_the_inputs_shape(channels):
    """A model predicting 2·C channels (learned σ) or another shape must fail clearly, never broadcast."""
    x0 = torch.randn(2, channels, 4, 4)

    class TwiceTheChannels(torch.nn.Module):
        def forward(self, x, t, y):
            return torch.cat([x, x], dim=1)

    with pytest.raises(ValueError, match=rf"predicts \(2, {2 * channels}, 4, 4\), the velocity target is "
                                         rf"\(2, {channels}, 4, 4\)"):
        flow.flow_loss(TwiceTheChannels(), x0, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_euler_is_exact_on_a_straight_flow(steps):
    # one data point x0: the marginal velocity is v(x, t) = (x − x0)/t, whose trajectories are straight
    x0 = torch.randn(2, 1, 4, 4)
    v = lambda x, t: (x - x0) / t.reshape(-1, 1, 1, 1)  # noqa: E731
    noise = torch.randn_like(x0)
    out = flow.euler_sample(v, noise, steps)
    assert torch.allclose(out, x0, atol=1e-5)


def test_euler_and_heun_on_a_linear_ode_match_their_closed_forms():
    a = 1.7  # dx/dt = a·x, integrated from t=1 to t=0: exact x(0) = x(1)·e^{−a}
    v = lambda x, t: a * x  # noqa: E731
    x1 = torch.ones(1, 1, 1, 1)
    steps = 8
    h = -1.0 / steps
    euler = flow.euler_sample(v, x1, steps).item()
    heun = flow.heun_sample(v, x1, steps).item()
    assert euler == pytest.approx((1 + a * h) ** steps, rel=1e-6)
    # Heun steps, then a final Euler step into t = 0
    assert heun == pytest.approx((1 + a * h + (a * h) ** 2 / 2) ** (steps - 1) * (1 + a * h), rel=1e-6)
    exact = torch.exp(torch.tensor(-a)).item()
    assert abs(heun - exact) < abs(euler - exact) / 2


def test_heun_never_evaluates_t0():
    seen = []
    flow.heun_sample(lambda x, t: seen.append(float(t[0])) or x, torch.ones(1, 1, 1, 1), 4)
    assert min(seen) > 0 and len(seen) == 2 * 4 - 1


def test_shift_formula():
    t = torch.linspace(0, 1, 11)
    for alpha in (1.0, 3.0, 0.5):
        assert torch.allclose(flow.shift_time(t, alpha), t * alpha / (1 + (alpha - 1) * t))
    assert flow.shift_time(torch.tensor(0.5), 3.0) == pytest.approx(0.75)
    ts = flow.timesteps(4, shift=3.0)
    assert ts[0] == 1 and ts[-1] == 0 and (ts[1:] < ts[:-1]).all()
    assert torch.allclose(ts, flow.shift_time(torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]), 3.0))


def test_logit_normal_and_uniform_t():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_t(200_000, "logit_normal", m=0.5, s=0.8, generator=g)
    z = torch.logit(t.double())
    assert abs(z.mean() - 0.5) < 0.01 and abs(z.std() - 0.8) < 0.01
    u = flow.sample_t(200_000, "uniform", generator=g)
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean() - 0.5) < 0.01
    shifted = flow.sample_t(200_000, "uniform", shift=3.0, generator=g)
    assert shifted.mean() > 0.6  # shift pushes training toward noise
    with pytest.raises(ValueError, match="t sampling must be 'uniform' or 'logit_normal', got 'beta'"):
        flow.sample_t(3, "beta")


# ---- guidance --------------------------------------------------------------------------------------------------
def trained_looking_dit(in_channels=1, seed=0):
    torch.manual_seed(seed)
    cfg = DiTConfig(input_size=8, in_channels=in_channels, patch_size=2, dim=16, depth=1, num_heads=2)
    model = DiT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def count_calls(model):
    """Record the batch size of every forward of `model`."""
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls


def test_cfg_scale_one_is_conditional_zero_is_unconditional():
    model = trained_looking_dit()
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([1, 2, 3])
    null = torch.full_like(y, model.null_label)
    cond, uncond = model(x, t, y), model(x, t, null)
    assert torch.allclose(guided(model, y, 1.0)(x, t), cond, atol=1e-6)
    assert torch.allclose(guided(model, y, 0.0)(x, t), uncond, atol=1e-5)
    assert torch.allclose(guided(model, y, 4.0)(x, t), uncond + 4 * (cond - uncond), atol=1e-5)


def test_cfg_guides_every_channel_with_one_batched_forward():
    model = trained_looking_dit(in_channels=4)
    calls = count_calls(model)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    out = guided(model, y, 3.0)(x, t)
    assert calls == [4]  # one forward on the doubled batch
    assert guided(model, y, 1.0)(x, t) is not None and calls == [4, 2]  # scale 1: the conditional model alone
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
    for c in range(4):  # DiT's released code guided only the first 3 channels
        assert torch.allclose(out[:, c], (uncond + 3 * (cond - uncond))[:, c], atol=1e-5)


def test_cfg_interval_guides_only_inside():
    model = trained_looking_dit()
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    v = guided(model, y, 3.0, interval=(0.2, 0.6))
    full = guided(model, y, 3.0)
    for tv, inside in ((0.1, False), (0.25, True), (0.4, True), (0.55, True), (0.65, False), (0.9, False)):
        t = torch.full((2,), tv)
        want = full(x, t) if inside else model(x, t, y)
        assert torch.allclose(v(x, t), want, atol=1e-5)


def test_autoguidance_extrapolates_away_from_the_weak_model_then_applies_cfg():
    good, bad = trained_looking_dit(), trained_looking_dit()
    with torch.no_grad():
        for p in bad.parameters():
            p.mul_(0.5)
    x, y, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.full((2,), 0.4)
    null = torch.full_like(y, good.null_label)
    cond, uncond, weak = good(x, t, y), good(x, t, null), bad(x, t, y)
    ag = weak + 1.5 * (cond - weak)
    assert torch.allclose(guided(good, y, 1.0, guide_model=bad, guide_scale=1.5)(x, t), ag, atol=1e-5)
    assert torch.allclose(guided(good, y, 2.0, guide_model=bad, guide_scale=1.5)(x, t),
                          uncond + 2.0 * (ag - uncond), atol=1e-5)
    # guide_scale 1 (or a guide that is the model itself) is plain CFG
    assert torch.allclose(guided(good, y, 2.0, guide_model=bad, guide_scale=1.0)(x, t),
                          guided(good, y, 2.0)(x, t), atol=1e-6)
    assert torch.allclose(guided(good, y, 2.0, guide_model=good, guide_scale=3.0)(x, t),
                          guided(good, y, 2.0)(x, t), atol=1e-5)


def test_guidance_works_the_same_for_an_eps_model():
    """The formula is the output's, whatever it predicts: a DDPM model's ε is guided the same way."""
    model = trained_looking_dit()
    x, y, s = torch.randn(2, 1, 8, 8), torch.tensor([4, 5]), DDPMSchedule()
    got = ddpm_solve(guided(model, y, 2.5), x, s, steps=1, clip_x0=False)  # one DDIM step from k = 999 to x0
    t, null = torch.full((2,), 0.999), torch.full_like(y, 10)
    cond, uncond = model(x, t, y), model(x, t, null)
    assert not torch.allclose(cond, uncond, atol=1e-3)
    eps = uncond + 2.5 * (cond - uncond)
    a = s.alphas_cumprod[999].item()
    assert torch.allclose(got, (x - (1 - a) ** 0.5 * eps) / a**0.5, rtol=1e-4, atol=1e-3)


def test_check_guidance():
    model = trained_looking_dit()
    check_guidance(model, 0.0, (0.0, 1.0), model, 0.0)  # the edges are allowed
    for args, match in [
        ((-1.0, None, None, 1.0), "cfg_scale and guide_scale must be ≥ 0, got -1.0, 1.0"),
        ((1.0, None, model, -0.5), "must be ≥ 0"),
        ((2.0, (0.7, 0.2), None, 1.0), r"cfg_interval must be \(lo, hi\) with 0 ≤ lo ≤ hi ≤ 1, got \(0.7, 0.2\)"),
        ((2.0, (-0.1, 0.5), None, 1.0), "cfg_interval"),
        ((2.0, (0.1, 1.5), None, 1.0), "cfg_interval"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_guidance(model, *args)
    other = DiT(DiTConfig(input_size=8, in_channels=2, patch_size=4, dim=32, depth=1, num_heads=2))
    assert inputs_of(model) == (1, 8, 10) and inputs_of(other) == (2, 8, 10)
    with pytest.raises(ValueError, match=r"guide_model must take the model's inputs .* \(1, 8, 10\), got \(2, 8, 10\)"):
        check_guidance(model, 2.0, None, other, 2.0)


# ---- the sampling loop --------------------------------------------------------------------------------------
def test_sample_is_reproducible_batched_and_draws_noise_from_the_generator():
    model = trained_looking_dit()
    y = torch.tensor([0, 1, 2, 3])
    a = sample(model, y, steps=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(1))
    b = sample(model, y, steps=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(1), batch_size=3)
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    c = sample(model, y, steps=3, cfg_scale=2.0, noise=noise)
    assert a.shape == (4, 1, 8, 8) and torch.allclose(a, b, atol=1e-5) and torch.equal(a, c)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_one_loop_for_every_solver_with_guidance(sampler):
    """sample() = the solver run on the guided prediction, with the NFE each solver promises."""
    assert SAMPLERS == ("euler", "heun", "ddim", "ancestral")
    model = trained_looking_dit()
    y, noise, steps = torch.tensor([3, 7]), torch.randn(2, 1, 8, 8), 4
    s = DDPMSchedule("cosine")
    calls = count_calls(model)
    out = sample(model, y, steps=steps, sampler=sampler, cfg_scale=2.0, shift=2.0, schedule=s, noise=noise.clone(),
                 generator=torch.Generator().manual_seed(5))
    nfe = 2 * steps - 1 if sampler == "heun" else steps
    assert calls == [4] * nfe  # one forward of the doubled batch per model evaluation
    predict = guided(model, y, 2.0)
    with torch.no_grad():
        if sampler == "euler":
            want = flow.euler_sample(predict, noise, steps, 2.0)
        elif sampler == "heun":
            want = flow.heun_sample(predict, noise, steps, 2.0)
        else:
            want = ddpm_solve(predict, noise, s, steps, sampler, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(out, want, atol=1e-5)


def test_cfg_interval_in_the_loop_doubles_the_batch_only_inside():
    model = trained_looking_dit()
    calls = count_calls(model)
    sample(model, torch.tensor([1, 2]), steps=4, cfg_scale=3.0, cfg_interval=(0.3, 0.8))
    assert calls == [2, 4, 4, 2]  # t = 1, 0.75, 0.5, 0.25


def test_autoguidance_in_the_loop_and_modes_restored():
    good, bad = trained_looking_dit(), trained_looking_dit(seed=1)
    good.train()
    bad.train()
    modes = []
    for m in (good, bad):
        m.register_forward_pre_hook(lambda mod, args: modes.append(mod.training))
    noise = torch.randn(3, 1, 8, 8)
    out = sample(good, torch.tensor([0, 1, 2]), steps=2, cfg_scale=1.5, guide_model=bad, guide_scale=2.0,
                 noise=noise)
    assert modes and not any(modes)  # both in eval mode while sampling
    assert good.training and bad.training  # and restored
    good.eval(), bad.eval()
    with torch.no_grad():
        want = flow.euler_sample(guided(good, torch.tensor([0, 1, 2]), 1.5, None, bad, 2.0), noise, 2)
    assert torch.allclose(out, want, atol=1e-5)


def test_modes_are_restored_when_sampling_fails():
    model = trained_looking_dit()
    model.train()

    def boom(m, args):
        raise RuntimeError("boom")

    model.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        sample(model, torch.tensor([1]), steps=1)
    assert model.training


def test_ddpm_samplers_in_latent_space_skip_clipping():
    """A fresh DiT predicts ε ≡ 0: DDIM from x_T in one step lands on x0 = x_T / √ᾱ_T, clipped to [−1, 1] or not."""
    model = DiT(DiTConfig(input_size=8, in_channels=4, patch_size=2, dim=16, depth=1, num_heads=2))
    noise, s = torch.randn(3, 4, 8, 8), DDPMSchedule()
    a = s.alphas_cumprod[999].item()
    out = sample(model, torch.arange(3), steps=1, sampler="ddim", schedule=s, clip_x0=False, noise=noise)
    assert torch.allclose(out, noise / a**0.5, rtol=1e-4)
    clipped = sample(model, torch.arange(3), steps=1, sampler="ddim", schedule=s, noise=noise)
    assert torch.allclose(clipped, (noise / a**0.5).clamp(-1, 1), atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="rk4"), r"sampler must be one of \('euler', 'heun', 'ddim', 'ancestral'\), got 'rk4'"),
    (dict(steps=0), "steps must be a positive int, got 0"),
    (dict(steps=2.5), "steps must be a positive int"),
    (dict(sampler="ddim"), "the 'ddim' sampler needs the DDPM model's schedule"),
    (dict(sampler="ancestral"), "the 'ancestral' sampler needs"),
    (dict(labels=torch.tensor([0, 11])), r"labels must be integers \(N,\) in \[0, 10\], got torch.int64 \(2,\)"),
    (dict(labels=torch.tensor([-1])), r"labels must be integers \(N,\) in \[0, 10\]"),
    (dict(labels=torch.tensor([1.0])), r"labels must be integers .* got torch.float32"),
    (dict(labels=torch.tensor([[1]])), r"labels must be integers .* \(1, 1\)"),
    (dict(labels=torch.tensor([], dtype=torch.long)), "labels must be integers"),
    (dict(noise=torch.randn(2, 1, 8, 4)), r"noise must have shape \(2, 1, 8, 8\), got \(2, 1, 8, 4\)"),
    (dict(cfg_scale=-1.0), "cfg_scale and guide_scale must be ≥ 0"),
    (dict(cfg_interval=(0.7, 0.2)), "cfg_interval must be"),
    (dict(guide_model="other", guide_scale=2.0), "guide_model must take the model's inputs"),
])
def test_bad_settings_fail_once_before_sampling(kwargs, match):
    model = trained_looking_dit()
    calls = count_calls(model)
    if kwargs.get("guide_model") == "other":
        kwargs["guide_model"] = DiT(DiTConfig(input_size=8, in_channels=2, patch_size=4, dim=32, depth=1, num_heads=2))
    labels = kwargs.pop("labels", torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=match):
        sample(model, labels, **{"steps": 2, **kwargs})
    assert calls == []  # nothing ran before the error
