import math

import pytest
import torch

from minidit import ddpm
from minidit.sampling import sample


def test_linear_and_cosine_schedules():
    lin = ddpm.DDPMSchedule("linear")
    assert lin.betas[0] == pytest.approx(1e-4) and lin.betas[-1] == pytest.approx(0.02)
    assert lin.alphas_cumprod[-1] < 1e-4  # essentially pure noise at k = 999
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.allclose(lin.alphas_cumprod, torch.cumprod(1 - betas, 0))
    cos = ddpm.DDPMSchedule("cosine")
    a = cos.alphas_cumprod
    assert (a[1:] < a[:-1]).all() and a[0] > 0.999 and a[-1] < 1e-4
    # Nichol & Dhariwal's ᾱ(k) = f(k+1)/f(0), f(u) = cos²((u/T + s)/(1 + s)·π/2), away from the β clip
    f = lambda u: math.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert a[500].item() == pytest.approx(f(501) / f(0), rel=1e-9)
    # cosine keeps more signal in the middle of the chain than linear
    assert cos.alphas_cumprod[500] > lin.alphas_cumprod[500]
    assert lin.model_time(torch.tensor([0, 500, 999])).tolist() == pytest.approx([0.0, 0.5, 0.999])
    with pytest.raises(ValueError, match="schedule must be 'linear' or 'cosine', got 'quadratic'"):
        ddpm.DDPMSchedule("quadratic")


def test_q_sample_moments():
    s = ddpm.DDPMSchedule()
    k = torch.full((20000,), 300)
    x0 = torch.full((20000, 1, 1, 1), 0.5)
    x = ddpm.q_sample(s, x0, k, torch.randn_like(x0))
    a = s.alphas_cumprod[300].item()
    assert x.mean().item() == pytest.approx(a**0.5 * 0.5, abs=0.02)
    assert x.var().item() == pytest.approx(1 - a, abs=0.02)


def test_predict_x0_inverts_q_sample():
    s = ddpm.DDPMSchedule("cosine")
    x0, noise = torch.rand(3, 1, 4, 4) * 2 - 1, torch.randn(3, 1, 4, 4)
    for k in (0, 400, 900):
        x_k = ddpm.q_sample(s, x0, torch.full((3,), k), noise)
        a = s.alphas_cumprod[k].item()
        torch.testing.assert_close(ddpm.predict_x0(x_k, noise, a), x0, atol=1e-3 * (1 / a) ** 0.5, rtol=0)


class OracleEps(torch.nn.Module):
    """Data = one point x0: the true ε given x_k is (x_k − √ᾱ x0)/√(1−ᾱ)."""

    def __init__(self, x0, schedule):
        super().__init__()
        self.x0, self.s = x0, schedule
        self.w = torch.nn.Parameter(torch.zeros(1))  # sample() finds the device from the parameters
        self.config = type("C", (), {"in_channels": 1, "input_size": 4})()
        self.null_label = 10

    def forward(self, x, t, y):
        k = (t * self.s.T).round().long()
        a = self.s.abar(k, x)
        return (x - a.sqrt() * self.x0) / (1 - a).sqrt()


@pytest.mark.parametrize("method", ["ddim", "ancestral"])
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 5, 50])
def test_samplers_recover_a_single_data_point(method, spacing, steps):
    s = ddpm.DDPMSchedule()
    x0 = torch.rand(1, 1, 4, 4) * 1.6 - 0.8
    model = OracleEps(x0, s)
    out = sample(model, torch.zeros(3, dtype=torch.long), steps=steps, sampler=method, schedule=s, spacing=spacing,
                 generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, x0.expand(3, -1, -1, -1), atol=1e-4)


def test_respaced_steps_trailing_and_linspace():
    s = ddpm.DDPMSchedule()
    assert ddpm.respaced_steps(s, 1) == [999] == ddpm.respaced_steps(s, 1, "linspace")
    assert ddpm.respaced_steps(s, 2) == [999, 499]  # trailing (Lin et al. 2024): the last step starts at T/2 − 1
    assert ddpm.respaced_steps(s, 2, "linspace") == [999, 0]
    assert ddpm.respaced_steps(s, 4) == [999, 749, 499, 249]
    ks = ddpm.respaced_steps(s, 10)  # the default spacing is trailing: every step does real work
    assert ks == list(range(999, 0, -100)) and ks[-1] == 99
    lin = ddpm.respaced_steps(s, 10, "linspace")
    assert lin[0] == 999 and lin[-1] == 0 and len(lin) == 10 and lin == sorted(lin, reverse=True)
    assert ddpm.respaced_steps(s, 1000) == list(range(999, -1, -1)) == ddpm.respaced_steps(s, 1000, "linspace")
    for bad in (0, 1001, 2.0):
        with pytest.raises(ValueError, match=r"steps must be an int in \[1, 1000\]"):
            ddpm.respaced_steps(s, bad)
    with pytest.raises(ValueError, match="spacing must be 'trailing' or 'linspace'"):
        ddpm.respaced_steps(s, 4, "leading")


def test_ddim_step_matches_its_formula():
    """One DDIM update (η = 0 and η = 1), written out from Song et al. eq. 12, for a made-up ε."""
    s = ddpm.DDPMSchedule("cosine")
    x, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4) * 0.1
    ks = ddpm.respaced_steps(s, 2)  # [999, 499]: check the second (last) step from k = 499 to x0, and the first
    a_t, a_prev = s.alphas_cumprod[999].item(), s.alphas_cumprod[499].item()
    seen = []

    def eps_fn(xx, t):
        seen.append(t[0].item())
        return eps

    g = torch.Generator().manual_seed(3)
    out = ddpm.ddpm_solve(eps_fn, x, s, steps=2, method="ddim", eta=0.0, clip_x0=False, generator=g)
    assert seen == pytest.approx([k / 1000 for k in ks])
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    x1 = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    want = (x1 - math.sqrt(1 - a_prev) * eps) / math.sqrt(a_prev)  # last step: ᾱ_prev = 1
    assert torch.allclose(out, want, atol=1e-5)
    # ancestral = η = 1: σ² = (1 − ᾱ_prev)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_prev), noise from the generator
    g = torch.Generator().manual_seed(3)
    out = ddpm.ddpm_solve(eps_fn, x, s, steps=2, method="ancestral", clip_x0=False, generator=g)
    sigma = math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    x1 = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps + sigma * z
    want = (x1 - math.sqrt(1 - a_prev) * eps) / math.sqrt(a_prev)
    assert torch.allclose(out, want, atol=1e-5)
    with pytest.raises(ValueError, match="method must be 'ddim' or 'ancestral'"):
        ddpm.ddpm_solve(eps_fn, x, s, steps=2, method="euler")


def test_ddpm_loss_targets_the_noise_at_time_k_over_T():
    s = ddpm.DDPMSchedule()
    x0 = torch.rand(1, 1, 4, 4)
    model = OracleEps(x0, s)
    k = torch.tensor([10, 500, 990])
    noise = torch.randn(3, 1, 4, 4)
    assert ddpm.ddpm_loss(model, s, x0.expand(3, -1, -1, -1), torch.zeros(3, dtype=torch.long), k, noise) < 1e-8
    seen = []

    def zero_eps(x, t, y):
        seen.append(t)
        return torch.zeros_like(x)

    loss = ddpm.ddpm_loss(zero_eps, s, x0.expand(3, -1, -1, -1), torch.zeros(3, dtype=torch.long), k, noise)
    assert loss.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)  # the target is ε itself
    assert torch.allclose(seen[0], k / 1000)
