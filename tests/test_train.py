import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch

from minidit.checkpoint import CheckpointError, load_checkpoint
from minidit.data import mnist_tensors
from minidit.guidance import drop_labels
from minidit.metrics import MnistClassifier
from minidit.models import DiT, get_config
from minidit.train import OBJECTIVES, TrainConfig, Trainer, native_bf16
from minidit.vae import VAE, VAEConfig

CFG = TrainConfig(steps=6, batch_size=16, lr=1e-3, warmup_steps=2, ema_decay=0.9, log_every=1, seed=3)
TINY_VAE = VAEConfig(factor=4, latent_channels=2, base_channels=8, max_channels=16)


def small_data(n=64):
    x, y = mnist_tensors("train")
    return x[:: 4000 // n][:n], y[:: 4000 // n][:n]


def make_model(objective="flow"):
    torch.manual_seed(0)
    if objective == "vae":
        return VAE(TINY_VAE)
    if objective == "classifier":
        return MnistClassifier()
    return DiT(get_config("mnist-tiny"))


def make_trainer(cfg=CFG, n=64, **kw):
    x, y = small_data(n)
    model = make_model(cfg.objective)
    return Trainer(model, x, None if cfg.objective == "vae" else y, cfg, **kw)


def params(m):
    return [p.detach().clone() for p in m.state_dict().values()]


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, objective):
    cfg = replace(CFG, objective=objective)
    full = make_trainer(cfg).run(progress=False)
    half = make_trainer(cfg).run(steps=3, progress=False, checkpoint_path=tmp_path / "s.safetensors")
    del half
    resumed = make_trainer(cfg)
    torch.manual_seed(123)  # a different global RNG state must not matter after load
    resumed.load(tmp_path / "s.safetensors")
    assert resumed.step == 3
    resumed.run(progress=False)
    for a, b in zip(params(full.model), params(resumed.model)):
        assert torch.equal(a, b)
    for a, b in zip(params(full.ema), params(resumed.ema)):
        assert torch.equal(a, b)
    sa, sb = full.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]


def test_batches_drawn_ahead_by_a_helper_thread_change_nothing(tmp_path):
    """The GPU path draws step s+1's batch in a thread during step s: same batches, same run; a resumed trainer
    whose drawn-ahead batch is for another step draws its own."""
    inline = make_trainer().run(progress=False)
    ahead = make_trainer()
    ahead.pool = ThreadPoolExecutor(max_workers=1)  # what a CUDA device gets
    ahead.run(steps=3, progress=False, checkpoint_path=tmp_path / "s.safetensors")
    assert ahead.next_batch is not None and ahead.next_batch[0] == 3
    ahead.step = 1  # as after loading an older checkpoint: the batch drawn for step 3 must not be used for step 1
    assert torch.equal(ahead.batch(1)["noise"], inline.batch(1)["noise"]) and ahead.next_batch is None
    ahead.load(tmp_path / "s.safetensors").run(progress=False)
    assert [h["loss"] for h in ahead.history] == [h["loss"] for h in inline.history]
    for a, b in zip(params(inline.model) + params(inline.ema), params(ahead.model) + params(ahead.ema)):
        assert torch.equal(a, b)


# ---- label dropout for classifier-free guidance: drawn by the Trainer ------------------------------------------
def test_label_dropout_mask_is_a_function_of_seed_and_step():
    tr = make_trainer(replace(CFG, batch_size=64, label_dropout=0.25))
    drops = torch.stack([tr.host_batch(s)["drop"] for s in range(200)])  # (200, 64)
    assert drops.dtype == torch.bool and abs(drops.float().mean().item() - 0.25) < 0.02
    again = make_trainer(replace(CFG, batch_size=64, label_dropout=0.25))
    assert all(torch.equal(again.host_batch(s)["drop"], drops[s]) for s in (0, 7, 199))
    other_seed = make_trainer(replace(CFG, batch_size=64, label_dropout=0.25, seed=4))
    assert not torch.equal(other_seed.host_batch(0)["drop"], drops[0])
    assert not make_trainer(replace(CFG, label_dropout=0.0)).host_batch(0)["drop"].any()


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_trainer_feeds_the_model_the_labels_with_the_dropped_ones_nulled(objective):
    tr = make_trainer(replace(CFG, objective=objective, batch_size=64, label_dropout=0.5))
    seen = []
    tr.model.register_forward_pre_hook(lambda m, args: seen.append(args[2]))
    b = tr.batch(5)
    assert b["drop"].any() and not b["drop"].all()
    tr.loss(b)
    assert torch.equal(seen[0], drop_labels(b["y"], b["drop"], 10))
    assert (seen[0][b["drop"]] == 10).all() and torch.equal(seen[0][~b["drop"]], b["y"][~b["drop"]])


def test_no_label_dropout_for_the_vae_and_the_classifier():
    tr = make_trainer(replace(CFG, objective="classifier", batch_size=64, label_dropout=0.5))
    b = tr.batch(0)
    assert b["drop"].any()
    logits = tr.model(b["x0"])  # the classifier's loss uses the true labels, whatever the mask says
    assert (b["y"] < 10).all() and logits.shape == (64, 10)


# ---- the other objectives -------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective,steps,ratio", [("flow", 120, 0.75), ("vae", 40, 0.5), ("classifier", 40, 0.8)])
def test_loss_goes_down_on_real_digits(objective, steps, ratio):
    cfg = replace(CFG, objective=objective, steps=steps, batch_size=32, lr=2e-3, log_every=1, warmup_steps=5)
    tr = make_trainer(cfg, n=256).run(progress=False)
    first = sum(h["loss"] for h in tr.history[:10]) / 10
    last = sum(h["loss"] for h in tr.history[-10:]) / 10
    assert last < ratio * first, (first, last)


def test_vae_objective_is_the_vae_loss_with_the_steps_noise():
    from minidit.vae import vae_loss

    tr = make_trainer(replace(CFG, objective="vae"))
    b = tr.batch(2)
    assert b["noise"].shape == (16, *TINY_VAE.latent_shape)
    assert torch.equal(tr.loss(b), vae_loss(tr.model, b["x0"], b["noise"])["loss"])


def test_classifier_objective_is_cross_entropy_on_augmented_digits():
    import torch.nn.functional as F

    from minidit.metrics import random_affine

    tr = make_trainer(replace(CFG, objective="classifier", label_smoothing=0.1))
    b = tr.batch(1)
    assert b["affine"].shape == (16, 4) and "noise" not in b
    want = F.cross_entropy(tr.model(random_affine(b["x0"], b["affine"])), b["y"], label_smoothing=0.1)
    assert torch.allclose(tr.loss(b), want)


def test_ema_warmup_and_update_copies_buffers():
    tr = make_trainer()
    before = params(tr.ema)
    tr.train_step()
    after_ema, model = params(tr.ema), params(tr.model)
    # first update: decay = min(0.9, 1/10) = 0.1 ⇒ ema = 0.1·old + 0.9·new
    for old, new, m in zip(before, after_ema, model):
        assert torch.allclose(new, 0.1 * old + 0.9 * m, atol=1e-6)
    clf = make_trainer(replace(CFG, objective="classifier"))
    clf.train_step()
    bn = "body.1.running_mean"
    assert not torch.equal(clf.model.state_dict()[bn], torch.zeros(32))
    assert torch.equal(clf.ema.state_dict()[bn], clf.model.state_dict()[bn])  # buffers copied, not averaged


def test_lr_warmup_and_cosine():
    tr = make_trainer(replace(CFG, steps=100, warmup_steps=10, lr_schedule="cosine", lr_min_ratio=0.1))
    assert tr.lr_at(0) == pytest.approx(1e-4) and tr.lr_at(9) == pytest.approx(1e-3)
    assert tr.lr_at(10) == pytest.approx(1e-3) and tr.lr_at(100) == pytest.approx(1e-4)
    assert tr.lr_at(55) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # halfway through the decay: cos = 0


def test_nan_loss_is_reported():
    tr = make_trainer(replace(CFG, lr=1e30, grad_clip=None))
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        tr.run(progress=False)


def test_bad_data_and_configs():
    x, y = small_data()
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"need finite images \(N, C, H, W\)"):
        Trainer(DiT(get_config("mnist-tiny")), x, y, CFG)
    with pytest.raises(ValueError, match=r"labels \(N,\), got \(64, 1, 28, 28\), \(3,\)"):
        Trainer(DiT(get_config("mnist-tiny")), small_data()[0], y[:3], CFG)
    with pytest.raises(ValueError, match="batch_size 1000 .* at most the dataset's 64 images"):
        Trainer(DiT(get_config("mnist-tiny")), *small_data(), replace(CFG, batch_size=1000))
    for bad in (dict(lr=0), dict(objective="score"), dict(ema_decay=1.0), dict(steps=0), dict(label_dropout=1.0),
                dict(label_dropout=-0.1), dict(t_sampling="beta"), dict(ddpm_schedule="sqrt")):
        with pytest.raises(ValueError, match=f"invalid TrainConfig: {next(iter(bad))}="):
            TrainConfig(**bad)


def test_gradients_are_freed_at_the_end_of_every_step():
    """Stale gradients alive through the next forward would add a full copy of the weights to its peak memory."""
    tr = make_trainer(replace(CFG, steps=2))
    tr.train_step()
    assert all(p.grad is None for p in tr.model.parameters())
    code = ("import torch; from minidit.models import DiT, get_config; from minidit.train import TrainConfig, Trainer; "
            "from minidit.variants.speed import peak_memory_bytes; torch.manual_seed(0); "
            "tr = Trainer(DiT(get_config('mnist-tiny')), torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,)), "
            "TrainConfig(steps=9, batch_size=8)); tr.train_step(); print(peak_memory_bytes(tr.train_step))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) > 0
    # torch's allocator warns when a block allocated before the profiler started is freed inside it: nothing
    # from before the step (gradients included) is freed during it
    assert "unknown size" not in run.stderr, run.stderr


def test_compile_mode_is_checked_and_passed_to_torch_compile(monkeypatch):
    with pytest.raises(ValueError, match="compile_mode"):
        replace(CFG, compile_mode="fastest")
    seen = []
    monkeypatch.setattr(torch, "compile", lambda module, mode=None: seen.append(mode) or module)
    tr = make_trainer(replace(CFG, compile=True, compile_mode="reduce-overhead"))
    assert seen == ["reduce-overhead"] and tr.net is tr.model


def test_bf16_and_grad_checkpointing_flags_run():
    tr = make_trainer(replace(CFG, bf16=True, grad_checkpointing=True, steps=2))
    tr.run(progress=False)
    assert tr.model.grad_checkpointing and tr.step == 2


@pytest.mark.parametrize("native", [False, True])
def test_bf16_auto_follows_the_cpus_bf16_units(monkeypatch, native):
    """bf16="auto" autocasts only where the CPU multiplies bf16 in hardware (AVX-512-BF16 or AMX)."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert native_bf16("cpu") == native
    tr = make_trainer(replace(CFG, bf16="auto", steps=1))
    seen = []
    tr.model.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    tr.train_step()
    assert tr.bf16 == native and seen == [torch.bfloat16 if native else torch.float32]
    assert make_trainer(replace(CFG, bf16=False)).bf16 is False and make_trainer(replace(CFG, bf16=True)).bf16


def test_bf16_setting_is_checked():
    with pytest.raises(ValueError, match="bf16='yes'"):
        TrainConfig(bf16="yes")


def test_resume_refuses_another_model_config_objective_or_seed(tmp_path):
    path = tmp_path / "s.safetensors"
    make_trainer().run(steps=1, progress=False, checkpoint_path=path)
    other = Trainer(DiT(get_config("mnist-tiny", depth=3)), *small_data(), CFG)
    with pytest.raises(CheckpointError, match="trained with config"):
        other.load(path)
    with pytest.raises(CheckpointError, match="trained with model DiT, this run has MnistClassifier"):
        Trainer(MnistClassifier(), *small_data(), replace(CFG, objective="classifier")).load(path)
    with pytest.raises(CheckpointError, match="objective 'flow' and seed 3, this run has 'ddpm' and 3"):
        make_trainer(replace(CFG, objective="ddpm")).load(path)
    with pytest.raises(CheckpointError, match="seed 3, this run has 'flow' and 4"):
        make_trainer(replace(CFG, seed=4)).load(path)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        make_trainer().load(tmp_path / "missing.safetensors")
    make_trainer(replace(CFG, lr=5e-4)).load(path)  # other optimisation settings may change on resume


DDP_SCRIPT = r"""
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_train import make_trainer, CFG
tr = make_trainer(CFG).run(progress=False, checkpoint_path={ckpt!r})
"""


@pytest.mark.slow
def test_torchrun_ddp_equals_single_process(tmp_path):
    """2 CPU processes (gloo) on the same global batch reach the same weights as one process — label dropout
    included: each process takes its slice of the same mask."""
    assert CFG.label_dropout > 0
    script = tmp_path / "ddp.py"
    ckpt = str(tmp_path / "ddp.safetensors")
    script.write_text(DDP_SCRIPT.format(tests=os.path.dirname(__file__), ckpt=ckpt))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    single = make_trainer(CFG).run(progress=False)
    tensors, meta = load_checkpoint(ckpt, kind="train-state")
    assert meta["step"] == CFG.steps
    for k, v in single.model.state_dict().items():
        assert torch.allclose(tensors[f"model.{k}"], v, atol=1e-5), k
    assert abs(meta["history"][-1]["loss"] - single.history[-1]["loss"]) < 1e-5


def test_time_budget_stops_the_run_and_drives_the_schedule():
    tr = make_trainer(replace(CFG, steps=10_000, time_budget=1.0, lr_schedule="cosine", warmup_steps=0))
    tr.run(progress=False)
    assert 1.0 <= tr.train_seconds < 1.0 + 5 * tr.train_seconds / tr.step + 0.5  # stops right after the budget
    assert tr.step < 10_000
    assert tr.progress() == 1.0 and tr.lr_at(tr.step, tr.progress()) == pytest.approx(CFG.lr * 0.1)
