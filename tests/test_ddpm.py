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


# ---- v-prediction and min-SNR-γ (Salimans & Ho 2022; Hang et al. 2023) -------------------------------------------
def _abar_by_hand(k: int) -> float:
    """ᾱ_k of the linear schedule, re-derived in plain Python: Π_{j≤k} (1 − β_j), β_j = 1e-4 + j·(0.02 − 1e-4)/999."""
    return math.prod(1 - (1e-4 + j * (0.02 - 1e-4) / 999) for j in range(k + 1))


def test_v_target_and_conversions_are_exact():
    """v = √ᾱ·ε − √(1−ᾱ)·x0; from (x_k, v): x0 = √ᾱ·x_k − √(1−ᾱ)·v and ε = √(1−ᾱ)·x_k + √ᾱ·v, exactly (float64)."""
    s = ddpm.DDPMSchedule()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1, torch.randn(3, 1, 4, 4, generator=g,
                                                                                             dtype=torch.float64)
    for k in (0, 10, 500, 999):
        a = _abar_by_hand(k)
        assert s.alphas_cumprod[k].item() == pytest.approx(a, rel=1e-9)
        kk = torch.full((3,), k)
        x_k = ddpm.q_sample(s, x0, kk, noise)
        v = math.sqrt(a) * noise - math.sqrt(1 - a) * x0
        torch.testing.assert_close(ddpm.v_target(x0, noise, s.abar(kk, x0)), v, atol=1e-12, rtol=0)
        eps_hat, x0_hat = ddpm.eps_and_x0(x_k, v, a, "v")
        torch.testing.assert_close(x0_hat, x0, atol=1e-9, rtol=0)
        torch.testing.assert_close(eps_hat, noise, atol=1e-9, rtol=0)
        # v ↔ ε at the same x_k: the ε-model's (ε, x̂0) and the v-model's agree
        eps_from_eps, x0_from_eps = ddpm.eps_and_x0(x_k, noise, a, "eps")
        if k > 0:  # at k = 0 the ε → x0 route divides by √ᾱ ≈ 1 but multiplies ε by √(1−ᾱ) = 0.01: still exact
            torch.testing.assert_close(x0_from_eps, x0, atol=1e-9, rtol=0)
        assert eps_from_eps is noise
    with pytest.raises(ValueError, match="prediction must be one of"):
        ddpm.eps_and_x0(x0, x0, 0.5, "x0")


def test_v_loss_targets_v_and_min_snr_weights():
    s = ddpm.DDPMSchedule()
    x0 = torch.rand(4, 1, 4, 4) * 2 - 1
    noise = torch.randn(4, 1, 4, 4)
    y = torch.zeros(4, dtype=torch.long)
    k = torch.tensor([0, 50, 400, 990])
    a = torch.tensor([_abar_by_hand(int(i)) for i in k], dtype=torch.float64)
    v = (a.sqrt().view(-1, 1, 1, 1) * noise - (1 - a).sqrt().view(-1, 1, 1, 1) * x0).float()

    def zero(x, t, y):
        return torch.zeros_like(x)

    def oracle_v(x, t, y):
        return v

    assert ddpm.ddpm_loss(oracle_v, s, x0, y, k, noise, prediction="v") < 1e-10
    # unweighted: the plain MSE to the target (ε or v)
    assert ddpm.ddpm_loss(zero, s, x0, y, k, noise, "v").item() == pytest.approx(v.pow(2).mean().item(), rel=1e-5)
    # min-SNR-γ: sample i's MSE weighted by min(SNR_i, γ)/SNR_i (ε) or min(SNR_i, γ)/(SNR_i + 1) (v)
    snr = a / (1 - a)
    for gamma in (0.5, 5.0):
        w_eps = [min(r, gamma) / r for r in snr.tolist()]
        w_v = [min(r, gamma) / (r + 1) for r in snr.tolist()]
        want_eps = sum(w * noise[i].pow(2).mean().item() for i, w in enumerate(w_eps)) / 4
        want_v = sum(w * v[i].pow(2).mean().item() for i, w in enumerate(w_v)) / 4
        assert ddpm.ddpm_loss(zero, s, x0, y, k, noise, "eps", gamma).item() == pytest.approx(want_eps, rel=1e-5)
        assert ddpm.ddpm_loss(zero, s, x0, y, k, noise, "v", gamma).item() == pytest.approx(want_v, rel=1e-5)
    # a γ above every SNR leaves the ε-loss unweighted
    assert ddpm.ddpm_loss(zero, s, x0, y, k, noise, "eps", 1e9).item() == pytest.approx(
        ddpm.ddpm_loss(zero, s, x0, y, k, noise).item(), rel=1e-6)
    with pytest.raises(ValueError, match="prediction must be one of"):
        ddpm.ddpm_loss(zero, s, x0, y, k, noise, "x0")


def test_every_weighting_is_a_weight_on_the_x0_error():
    """‖ε̂ − ε‖² = SNR·‖x̂0 − x0‖², ‖v̂ − v‖² = (SNR + 1)·‖x̂0 − x0‖²: min-SNR-γ makes both min(SNR, γ)·‖x̂0 − x0‖²."""
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64), torch.randn(2, 1, 3, 3, generator=g,
                                                                                      dtype=torch.float64)
    for a in (0.999, 0.5, 0.01):
        x_k = math.sqrt(a) * x0 + math.sqrt(1 - a) * noise
        x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64)  # some estimate of x0
        eps_hat = (x_k - math.sqrt(a) * x0_hat) / math.sqrt(1 - a)  # the ε and v that imply that x̂0
        v_hat = math.sqrt(a) * eps_hat - math.sqrt(1 - a) * x0_hat
        v = math.sqrt(a) * noise - math.sqrt(1 - a) * x0
        snr, err = a / (1 - a), (x0_hat - x0).pow(2).sum().item()
        assert (eps_hat - noise).pow(2).sum().item() == pytest.approx(snr * err, rel=1e-9)
        assert (v_hat - v).pow(2).sum().item() == pytest.approx((snr + 1) * err, rel=1e-9)
        for gamma in (0.1, 5.0):
            assert (min(snr, gamma) / snr) * (eps_hat - noise).pow(2).sum().item() == pytest.approx(
                min(snr, gamma) * err, rel=1e-9)
            assert (min(snr, gamma) / (snr + 1)) * (v_hat - v).pow(2).sum().item() == pytest.approx(
                min(snr, gamma) * err, rel=1e-9)


class OracleV(OracleEps):
    """The same single data point, predicted as v = √ᾱ·ε − √(1−ᾱ)·x0."""

    def forward(self, x, t, y):
        k = (t * self.s.T).round().long()
        a = self.s.abar(k, x)
        eps = (x - a.sqrt() * self.x0) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * self.x0


@pytest.mark.parametrize("method", ["ddim", "ancestral"])
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_v_model_samples_like_the_eps_model(method, spacing):
    """A v-model sampled with prediction='v' follows the same chain as the ε-model it is equivalent to."""
    s = ddpm.DDPMSchedule("cosine")
    x0 = torch.rand(1, 1, 4, 4) * 1.6 - 0.8
    labels, z = torch.zeros(3, dtype=torch.long), torch.randn(3, 1, 4, 4)
    runs = {}
    for name, model, prediction in (("eps", OracleEps(x0, s), "eps"), ("v", OracleV(x0, s), "v")):
        runs[name] = sample(model, labels, steps=5, sampler=method, schedule=s, spacing=spacing, noise=z.clone(),
                            generator=torch.Generator().manual_seed(0), prediction=prediction)
    assert torch.allclose(runs["v"], x0.expand(3, -1, -1, -1), atol=1e-4)
    assert torch.allclose(runs["v"], runs["eps"], atol=1e-5)
    if spacing == "trailing":  # read as ε, the v-model's output is wrong: the conversion is what makes it work
        wrong = sample(OracleV(x0, s), labels, steps=5, sampler=method, schedule=s, spacing=spacing, noise=z.clone(),
                       generator=torch.Generator().manual_seed(0))
        assert not torch.allclose(wrong, x0.expand(3, -1, -1, -1), atol=1e-2)
    # (with linspace the last evaluation is at k = 0, where v = √ᾱ·ε − √(1−ᾱ)·x0 ≈ ε: the mistake would hide there)
    with pytest.raises(ValueError, match="prediction must be one of"):
        sample(OracleV(x0, s), labels, steps=2, sampler=method, schedule=s, prediction="x0")


def test_trainer_passes_the_prediction_and_weighting_to_the_loss():
    from minidit.models import DiT, get_config
    from minidit.train import TrainConfig, Trainer

    x, y = torch.rand(32, 1, 28, 28) * 2 - 1, torch.arange(32) % 10
    for prediction, gamma in (("eps", None), ("v", None), ("eps", 5.0), ("v", 5.0)):
        torch.manual_seed(0)
        model = DiT(get_config("mnist-tiny"))
        with torch.no_grad():
            model.final_layer.linear.weight.normal_(0, 0.02)  # a fresh DiT outputs 0
        cfg = TrainConfig(steps=1, batch_size=8, objective="ddpm", ddpm_prediction=prediction, min_snr_gamma=gamma,
                          label_dropout=0.0)
        tr = Trainer(model, x, y, cfg)
        b = tr.batch(0)
        want = ddpm.ddpm_loss(model, tr.schedule, b["x0"], b["y"], b["t"], b["noise"], prediction, gamma)
        assert tr.loss(b).item() == pytest.approx(want.item(), rel=1e-6)
    for bad in (dict(ddpm_prediction="x0"), dict(min_snr_gamma=0.0)):
        with pytest.raises(ValueError, match="invalid TrainConfig"):
            TrainConfig(objective="ddpm", **bad)


def test_cli_sample_converts_a_v_models_output(tmp_path, capsys):
    """`minidit sample` reads the prediction type a DDPM checkpoint was trained with."""
    from dataclasses import asdict

    from minidit.checkpoint import save_model
    from minidit.cli import main
    from minidit.models import DiT, get_config
    from minidit.train import TrainConfig

    path = tmp_path / "model.safetensors"
    save_model(path, DiT(get_config("mnist-tiny")),
               train=asdict(TrainConfig(objective="ddpm", ddpm_prediction="v", min_snr_gamma=5.0)))
    code = main(["sample", "--checkpoint", str(path), "--n", "2", "--steps", "2", "--sampler", "ddim",
                 "--out", str(tmp_path / "s.npz"), "--device", "cpu"])
    assert code == 0 and "'prediction': 'v'" in capsys.readouterr().err
