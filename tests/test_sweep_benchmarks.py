"""Smoke runs of the NFE sweep, conditioning ablation, VAE rate–distortion and latent-vs-pixel benchmarks.

Each runs its --quick mode further shrunk (a few steps, N = 20) and checks the JSON it writes has the promised
rows and fields; the figures themselves come from the full runs committed under benchmarks/results/.
"""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_nfe_sweep_writes_every_method_and_nfe(tmp_path, load_benchmark):
    out = tmp_path / "nfe.json"
    sweep = load_benchmark("nfe_sweep")
    sweep.main(["--quick", "--steps", "3", "--n", "20", "--nfe", "1,2,5", "--threads", "1",
                "--json", str(out), "--plot", str(tmp_path / "nfe.png"), "--save-models", str(tmp_path / "m")])
    res = json.loads(out.read_text())
    assert res["ddpm_spacing"] == "trailing"  # the package's default respacing (Lin et al. 2024)
    got = {(r["method"], r["nfe"]) for r in res["rows"]}
    for nfe in (1, 2, 5):
        for method in ("ddpm-ancestral", "ddpm-ddim", "ddpm-v-ancestral", "ddpm-v-ddim", "rf-euler",
                       "rf-uniform-euler"):
            assert (method, nfe) in got
    # Heun with k steps costs 2k − 1 NFE (the last step is Euler): NFE 5 is 3 steps; NFE 1 and 2 would be plain Euler
    assert ("rf-heun", 5) in got and not {("rf-heun", 1), ("rf-heun", 2)} & got
    assert next(r for r in res["rows"] if r["method"] == "rf-heun")["solver_steps"] == 3
    for r in res["rows"]:
        assert {"conditional_accuracy", "fid", "fid_floor", "n"} <= set(r) and r["n"] == 20
    objectives = {"rf-lognorm", "rf-uniform", "ddpm", "ddpm-v"}
    assert {t["objective"] for t in res["training"]} == objectives
    assert len({t["train_flops"] for t in res["training"]}) == 1  # same compute for every objective
    # the validation grid: every (objective, lr, EMA decay) scored on the validation digits after half the steps,
    # the best lr trained on to all of them and scored again at every decay; the best of those is chosen
    val = res["validation"]
    assert (val["train_split"], val["reference"]) == ("fit", "val")
    assert len(val["rows"]) == len(objectives) * (len(val["lrs"]) + 1) * len(val["ema_decays"])
    assert {r["steps"] for r in val["rows"]} == {1, 3}  # --steps 3: half is 1
    for name, choice in val["chosen"].items():
        best = min((r for r in val["rows"] if r["objective"] == name and r["steps"] == 3), key=lambda r: r["fid"])
        assert (choice["lr"], choice["ema_decay"]) == (best["lr"], best["ema_decay"])
        t = next(t for t in res["training"] if t["objective"] == name)
        assert (t["lr"], t["ema_decay"]) == (choice["lr"], choice["ema_decay"])
    # the saved v-model records its prediction type (minidit sample reads it)
    from minidit.checkpoint import read_meta

    assert read_meta(tmp_path / "m" / "nfe_ddpm-v.safetensors")["train"]["ddpm_prediction"] == "v"
    assert (tmp_path / "nfe.png").stat().st_size > 0
    # --validation reuses a recorded grid instead of running it
    out2 = tmp_path / "nfe2.json"
    sweep.main(["--quick", "--steps", "2", "--n", "20", "--nfe", "1", "--threads", "1", "--validation", str(out),
                "--json", str(out2)])
    res2 = json.loads(out2.read_text())
    assert res2["validation"]["chosen"] == val["chosen"] and res2["validation"]["reused_from"] == str(out)


def test_nfe_sweep_ema_copies_follow_the_trainer(load_benchmark):
    """The grid's EMA copies (one training run, several decays) equal what the Trainer's own EMA gives."""
    import torch

    sweep = load_benchmark("nfe_sweep")
    settings = {**sweep.QUICK, "steps": 4, "batch_size": 8}
    tr = sweep.make_trainer("ddpm-v", settings, 1e-3, 0.9, "fit", seed=0)
    emas = sweep.EMAs(tr.model, [0.05, 0.9])  # (the warm-up caps decays at 0.1–0.3 in 4 steps)
    tr.run(progress=False, callback=emas)
    assert all(torch.equal(a, b) for a, b in zip(emas.models[0.9].parameters(), tr.ema.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(emas.models[0.05].parameters(), tr.ema.parameters()))


@pytest.mark.slow
def test_conditioning_ablation_rows(tmp_path, load_benchmark):
    out = tmp_path / "abl.json"
    load_benchmark("conditioning_ablation").main(["--quick", "--steps", "3", "--n", "20", "--threads", "1",
                                                  "--json", str(out)])
    res = json.loads(out.read_text())
    assert len(res["rows"]) == 10  # 5 variants × 2 seeds
    for r in res["rows"]:
        assert {"variant", "params", "flops", "conditional_accuracy", "fid", "fid_floor", "seed"} <= set(r)
    params = {r["variant"]: r["params"] for r in res["rows"]}
    assert params["adaln-zero"] == params["adaln-gated"] > params["adaln"] > params["in-context"]
    assert isinstance(res["ranking_holds_on_mean"], bool) and len(res["summary"]) == 5
    assert res["dit_ranking"] == ["adaln-zero", "adaln", "cross-attention", "in-context"]  # DiT has no gated row


@pytest.mark.slow
def test_vae_rate_distortion_rows(tmp_path, load_benchmark):
    out = tmp_path / "rd.json"
    load_benchmark("vae_rate_distortion").main(["--quick", "--configs", "8x4", "--steps", "2", "--threads", "1",
                                      "--json", str(out)])
    (r,) = json.loads(out.read_text())["rows"]
    assert (r["factor"], r["latent_channels"], r["values_kept"]) == (8, 4, 64)
    assert {"psnr", "mse", "kl_bits", "classifier_accuracy_reconstructed", "recon_fid", "fid_floor"} <= set(r)


@pytest.mark.slow
def test_latent_vs_pixel_rows(tmp_path, load_benchmark):
    out = tmp_path / "lp.json"
    load_benchmark("latent_vs_pixel").main(["--quick", "--budget", "0.5", "--n", "20", "--threads", "1",
                                            "--json", str(out)])
    res = json.loads(out.read_text())
    tokens = {r["name"]: r["tokens"] for r in res["rows"]}
    assert tokens == {"pixel-64": 64, "latent-64": 64, "pixel-16": 16, "latent-16": 16}
    for r in res["rows"]:
        assert {"conditional_accuracy", "fid", "fid_floor", "sample_seconds", "seconds_per_step"} <= set(r)


@pytest.mark.parametrize("folder", ["nfe_quick_models", "nfe_full_models"])
def test_committed_sweep_models_load(folder):
    """The NFE sweep's saved models (lesson 07 samples the quick ones, the probe reads the full ones) are readable
    checkpoints of the current format, with the training settings the probe needs."""
    from minidit.checkpoint import load_model, read_meta

    paths = sorted((ROOT / "benchmarks" / "results" / folder).glob("nfe_*.safetensors"))
    assert {p.stem for p in paths} >= {"nfe_ddpm", "nfe_rf-lognorm"}
    for path in paths:
        model, train = load_model(path), read_meta(path)["train"]
        assert model.config.in_channels == 1 and train["objective"] in ("flow", "ddpm")


def test_denoise_probe_inverts_each_objective_exactly(load_benchmark):
    """With a model that returns the true target (ε for DDPM, ε − x0 for RF), the one-step x̂0 is the clean image."""
    import torch

    from minidit.ddpm import DDPMSchedule

    probe = load_benchmark("denoise_probe")
    x0 = torch.rand(4, 1, 28, 28) * 2 - 1
    noise = torch.randn_like(x0)
    y = torch.arange(4)
    for s in probe.SQRT_SNR:
        est, w = probe.x0_estimate(lambda x, t, y: noise, {"objective": "ddpm", "ddpm_schedule": "linear"},
                                   x0, noise, y, s)
        assert torch.allclose(est, x0, atol=1e-4) and w == pytest.approx(s**2, rel=0.05)  # ε-loss weight = SNR
        est, w = probe.x0_estimate(lambda x, t, y: noise - x0, {"objective": "flow"}, x0, noise, y, s)
        assert torch.allclose(est, x0, atol=1e-5) and w == pytest.approx((1 + s) ** 2)  # v-loss weight = 1/t²

        def oracle_v(x, t, y):  # DDPM v-prediction: v = √ᾱ·ε − √(1 − ᾱ)·x0 at the step the probe picked
            a = DDPMSchedule("linear").alphas_cumprod[(t[0] * 1000).round().long()].item()
            return a**0.5 * noise - (1 - a) ** 0.5 * x0

        v_model = {"objective": "ddpm", "ddpm_schedule": "linear", "ddpm_prediction": "v"}
        est, w = probe.x0_estimate(oracle_v, v_model, x0, noise, y, s)
        assert torch.allclose(est, x0, atol=1e-4) and w == pytest.approx(s**2 + 1, rel=0.05)  # SNR + 1
        _, w = probe.x0_estimate(oracle_v, {**v_model, "min_snr_gamma": 1.0}, x0, noise, y, s)
        assert w == pytest.approx(min(s**2, 1.0), rel=0.05)  # min-SNR-γ: min(SNR, γ) for either target


def test_denoise_probe_high_noise_shares(load_benchmark):
    """A model that predicts ε = 0 has the same ε-loss on every draw, so its loss share equals its draw share;
    DDPM's uniform k puts about three quarters of the linear schedule's steps at √SNR < 1."""
    import torch

    probe = load_benchmark("denoise_probe")
    x0 = torch.rand(50, 1, 28, 28) * 2 - 1
    y = torch.arange(50) % 10
    draws, loss = probe.high_noise_shares(lambda x, t, y: torch.zeros_like(x),
                                          {"objective": "ddpm", "ddpm_schedule": "linear"}, x0, y, repeats=40)
    assert 0.70 < draws < 0.80 and loss == pytest.approx(draws, abs=0.02)


@pytest.mark.slow
def test_denoise_probe_rows(tmp_path, load_benchmark):
    out = tmp_path / "probe.json"
    load_benchmark("denoise_probe").main(["--models", str(ROOT / "benchmarks" / "results" / "nfe_quick_models"),
                                "--n", "20", "--threads", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["model"] for r in rows} == {"ddpm", "ddpm-v", "rf-lognorm", "rf-uniform"} and len(rows) == 20
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["follows_label"] <= 1 and r["x0_mse"] > 0


def test_caption_faithfulness_reads_the_shipped_models(tmp_path, monkeypatch, load_benchmark):
    """The shipped shapes models: training info from their JSON, and a tiny final evaluation (2 captions, 2 steps)
    in which CFG leaves the conditional branch's attention weights unchanged (lesson 11's finding)."""
    import argparse

    from minidit.checkpoint import load_model

    cf = load_benchmark("caption_faithfulness")
    out = cf.final_evaluation(load_model(cf.shipped("dit")), argparse.Namespace(cfg=3.0, sample_steps=2), 2, 2, 2, 2)
    assert set(out["faithfulness"]) == {"seen", "heldout"} and set(out["faithfulness"]["seen"]) == {"cfg_1", "cfg_3"}
    assert all(v["max_attention_change"] < 1e-4 for v in out["cfg_attention"].values())
    monkeypatch.setattr(cf, "final_evaluation", lambda *a: {"faithfulness": {}})
    path = tmp_path / "cf.json"
    assert cf.main(["--json", str(path), "--threads", "1"]) == 0
    for backbone, r in json.loads(path.read_text())["models"].items():
        t = r["training"]
        assert t["source"] == f"minidit/weights/shapes_{backbone}.safetensors" and t["steps"] == 1500
        assert t["params"] > 0 and t["final_loss"] > 0 and t["curves_by_seed"]
