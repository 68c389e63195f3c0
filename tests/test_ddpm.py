import pytest
import torch

from minidit import ddpm


def test_linear_and_cosine_schedules():
    lin = ddpm.DDPMSchedule("linear")
    assert lin.betas[0] == pytest.approx(1e-4) and lin.betas[-1] == pytest.approx(0.02)
    assert lin.alphas_cumprod[-1] < 1e-4  # essentially pure noise at k = 999
    cos = ddpm.DDPMSchedule("cosine")
    a = cos.alphas_cumprod
    assert (a[1:] < a[:-1]).all() and a[0] > 0.999 and a[-1] < 1e-4
    # cosine keeps more signal in the middle of the chain than linear
    assert cos.alphas_cumprod[500] > lin.alphas_cumprod[500]
    with pytest.raises(ValueError, match="schedule must be"):
        ddpm.DDPMSchedule("quadratic")


def test_q_sample_moments():
    s = ddpm.DDPMSchedule()
    k = torch.full((20000,), 300)
    x0 = torch.full((20000, 1, 1, 1), 0.5)
    x = ddpm.q_sample(s, x0, k, torch.randn_like(x0))
    a = s.alphas_cumprod[300].item()
    assert x.mean().item() == pytest.approx(a**0.5 * 0.5, abs=0.02)
    assert x.var().item() == pytest.approx(1 - a, abs=0.02)
    with pytest.raises(ValueError, match="integer steps"):
        ddpm.q_sample(s, x0[:2], torch.tensor([0, 1000]), x0[:2])


def test_predict_x0_inverts_q_sample():
    s = ddpm.DDPMSchedule("cosine")
    x0, noise = torch.rand(3, 1, 4, 4) * 2 - 1, torch.randn(3, 1, 4, 4)
    for k in (0, 400, 900):
        x_k = ddpm.q_sample(s, x0, torch.full((3,), k), noise)
        a = s.alphas_cumprod[k].item()
        torch.testing.assert_close(ddpm.predict_x0(x_k, noise, a), x0, atol=1e-3 * (1 / a) ** 0.5, rtol=0)
    with pytest.raises(ValueError, match="abar"):
        ddpm.predict_x0(x0, noise, 0.0)


class OracleEps(torch.nn.Module):
    """Data = one point x0: the true ε given x_k is (x_k − √ᾱ x0)/√(1−ᾱ)."""

    def __init__(self, x0, schedule):
        super().__init__()
        self.x0, self.s = x0, schedule
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"in_channels": 1, "input_size": 4})()
        self.null_label = 10

    def forward(self, x, t, y, drop_mask=None):
        k = (t * self.s.T).round().long()
        a = self.s.abar(k, x)
        return (x - a.sqrt() * self.x0) / (1 - a).sqrt()


@pytest.mark.parametrize("method", ["ddim", "ancestral"])
@pytest.mark.parametrize("steps", [1, 5, 50])
def test_samplers_recover_a_single_data_point(method, steps):
    s = ddpm.DDPMSchedule()
    x0 = torch.rand(1, 1, 4, 4) * 1.6 - 0.8
    model = OracleEps(x0, s)
    out = ddpm.ddpm_sample(model, s, torch.zeros(3, dtype=torch.long), steps=steps, method=method,
                           generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, x0.expand(3, -1, -1, -1), atol=1e-4)


def test_respaced_steps():
    s = ddpm.DDPMSchedule()
    assert ddpm.respaced_steps(s, 1) == [999]
    ks = ddpm.respaced_steps(s, 10)
    assert ks[0] == 999 and ks[-1] == 0 and len(ks) == 10 and ks == sorted(ks, reverse=True)
    assert len(ddpm.respaced_steps(s, 1000)) == 1000
    with pytest.raises(ValueError, match="steps must be"):
        ddpm.respaced_steps(s, 0)


def test_ddpm_loss_targets_the_noise():
    s = ddpm.DDPMSchedule()
    x0 = torch.rand(1, 1, 4, 4)
    model = OracleEps(x0, s)
    k = torch.tensor([10, 500, 990])
    noise = torch.randn(3, 1, 4, 4)
    assert ddpm.ddpm_loss(model, s, x0.expand(3, -1, -1, -1), torch.zeros(3, dtype=torch.long), k, noise) < 1e-8
