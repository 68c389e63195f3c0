import pytest
import torch

from minidit import flow
from minidit.models import DiT, DiTConfig


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

    def forward(self, x, t, y, drop_mask=None):
        return self.eps - self.x0


def test_flow_loss_is_zero_for_the_true_velocity_and_positive_otherwise():
    x0, eps = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    t = torch.rand(4)
    assert flow.flow_loss(Oracle(x0, eps), x0, torch.zeros(4, dtype=torch.long), t, eps) == 0
    assert flow.flow_loss(Oracle(x0, -eps), x0, torch.zeros(4, dtype=torch.long), t, eps) > 0


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
    with pytest.raises(ValueError, match="shift must be > 0"):
        flow.shift_time(t, 0.0)


def test_logit_normal_and_uniform_t():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_t(200_000, "logit_normal", m=0.5, s=0.8, generator=g)
    z = torch.logit(t.double())
    assert abs(z.mean() - 0.5) < 0.01 and abs(z.std() - 0.8) < 0.01
    u = flow.sample_t(200_000, "uniform", generator=g)
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean() - 0.5) < 0.01
    shifted = flow.sample_t(200_000, "uniform", shift=3.0, generator=g)
    assert shifted.mean() > 0.6  # shift pushes training toward noise
    with pytest.raises(ValueError, match="t sampling must be one of"):
        flow.sample_t(3, "beta")


def _trained_looking_dit(in_channels=1):
    torch.manual_seed(0)
    cfg = DiTConfig(input_size=8, in_channels=in_channels, patch_size=2, dim=16, depth=1, num_heads=2)
    model = DiT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_cfg_scale_one_is_conditional_zero_is_unconditional():
    model = _trained_looking_dit()
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([1, 2, 3])
    null = torch.full_like(y, model.null_label)
    cond, uncond = model(x, t, y), model(x, t, null)
    assert torch.allclose(flow.guided(model, y, 1.0)(x, t), cond, atol=1e-6)
    assert torch.allclose(flow.guided(model, y, 0.0)(x, t), uncond, atol=1e-5)
    assert torch.allclose(flow.guided(model, y, 4.0)(x, t), uncond + 4 * (cond - uncond), atol=1e-5)


def test_cfg_guides_every_channel_with_one_batched_forward():
    model = _trained_looking_dit(in_channels=4)
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    out = flow.guided(model, y, 3.0)(x, t)
    assert calls == [4]  # one forward on the doubled batch
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
    for c in range(4):  # DiT's released code guided only the first 3 channels
        assert torch.allclose(out[:, c], (uncond + 3 * (cond - uncond))[:, c], atol=1e-5)


def test_sample_is_reproducible_and_validates():
    model = _trained_looking_dit()
    y = torch.tensor([0, 1, 2, 3])
    a = flow.sample(model, y, steps=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(1))
    b = flow.sample(model, y, steps=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(1), batch_size=3)
    assert a.shape == (4, 1, 8, 8) and torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="sampler must be one of"):
        flow.sample(model, y, sampler="rk4")
    with pytest.raises(ValueError, match="cfg_scale"):
        flow.sample(model, y, cfg_scale=-1)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        flow.sample(model, y, steps=0)


def test_cfg_interval_guides_only_inside():
    model = _trained_looking_dit()
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    v = flow.guided(model, y, 3.0, interval=(0.2, 0.6))
    full = flow.guided(model, y, 3.0)
    for tv, inside in ((0.1, False), (0.4, True), (0.9, False)):
        t = torch.full((2,), tv)
        want = full(x, t) if inside else model(x, t, y)
        assert torch.allclose(v(x, t), want, atol=1e-5)
    with pytest.raises(ValueError, match="interval"):
        flow.guided(model, y, 3.0, interval=(0.7, 0.2))


def test_autoguidance_extrapolates_away_from_the_weak_model_then_applies_cfg():
    good, bad = _trained_looking_dit(), _trained_looking_dit()
    with torch.no_grad():
        for p in bad.parameters():
            p.mul_(0.5)
    x, y, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.full((2,), 0.4)
    null = torch.full_like(y, good.null_label)
    cond, uncond, weak = good(x, t, y), good(x, t, null), bad(x, t, y)
    ag = weak + 1.5 * (cond - weak)
    assert torch.allclose(flow.guided(good, y, 1.0, guide_model=bad, guide_scale=1.5)(x, t), ag, atol=1e-5)
    assert torch.allclose(flow.guided(good, y, 2.0, guide_model=bad, guide_scale=1.5)(x, t),
                          uncond + 2.0 * (ag - uncond), atol=1e-5)
    # guide_scale 1 (or a guide that is the model itself) is plain CFG
    assert torch.allclose(flow.guided(good, y, 2.0, guide_model=bad, guide_scale=1.0)(x, t),
                          flow.guided(good, y, 2.0)(x, t), atol=1e-6)
    assert torch.allclose(flow.guided(good, y, 2.0, guide_model=good, guide_scale=3.0)(x, t),
                          flow.guided(good, y, 2.0)(x, t), atol=1e-5)
    with pytest.raises(ValueError, match="guide_scale must be ≥ 0"):
        flow.guided(good, y, 2.0, guide_model=bad, guide_scale=-1.0)


def test_sample_with_a_guide_puts_it_in_eval_mode_and_checks_its_inputs():
    good, bad = _trained_looking_dit(), _trained_looking_dit()
    bad.train()
    g = torch.Generator().manual_seed(0)
    out = flow.sample(good, torch.tensor([0, 1, 2]), steps=2, cfg_scale=1.5, guide_model=bad, guide_scale=2.0,
                      generator=g)
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all() and bad.training  # mode restored
    other = DiT(DiTConfig(input_size=8, in_channels=2, patch_size=4, dim=32, depth=1, num_heads=2))
    with pytest.raises(ValueError, match="guide_model must take the model's inputs"):
        flow.sample(good, torch.tensor([0]), steps=1, guide_model=other, guide_scale=2.0)
