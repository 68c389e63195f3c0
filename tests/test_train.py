import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from minidit.data import mnist_tensors
from minidit.models import DiT, get_config
from minidit.train import TrainConfig, Trainer, native_bf16

CFG = TrainConfig(steps=6, batch_size=16, lr=1e-3, warmup_steps=2, ema_decay=0.9, log_every=1, seed=3)


def small_data(n=64):
    x, y = mnist_tensors("train")
    return x[:: 4000 // n][:n], y[:: 4000 // n][:n]


def make_trainer(cfg=CFG, **kw):
    torch.manual_seed(0)
    return Trainer(DiT(get_config("mnist-tiny")), *small_data(), cfg, **kw)


def params(m):
    return [p.detach().clone() for p in m.state_dict().values()]


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
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
    from concurrent.futures import ThreadPoolExecutor

    inline = make_trainer().run(progress=False)
    ahead = make_trainer()
    ahead._pool = ThreadPoolExecutor(max_workers=1)  # what a CUDA device gets
    ahead.run(steps=3, progress=False, checkpoint_path=tmp_path / "s.safetensors")
    assert ahead._next is not None and ahead._next[0] == 3
    ahead.step = 1  # as after loading an older checkpoint: the batch drawn for step 3 must not be used for step 1
    assert torch.equal(ahead.batch(1)["noise"], inline.batch(1)["noise"]) and ahead._next is None
    ahead.load(tmp_path / "s.safetensors").run(progress=False)
    assert [h["loss"] for h in ahead.history] == [h["loss"] for h in inline.history]
    for a, b in zip(params(inline.model) + params(inline.ema), params(ahead.model) + params(ahead.ema)):
        assert torch.equal(a, b)


def test_ema_warmup_and_update():
    tr = make_trainer()
    before = params(tr.ema)
    tr.train_step()
    after_ema, model = params(tr.ema), params(tr.model)
    # first update: decay = min(0.9, 1/10) = 0.1 ⇒ ema = 0.1·old + 0.9·new
    for old, new, m in zip(before, after_ema, model):
        assert torch.allclose(new, 0.1 * old + 0.9 * m, atol=1e-6)


def test_lr_warmup_and_cosine():
    tr = make_trainer(replace(CFG, steps=100, warmup_steps=10, lr_schedule="cosine", lr_min_ratio=0.1))
    assert tr.lr_at(0) == pytest.approx(1e-4) and tr.lr_at(9) == pytest.approx(1e-3)
    assert tr.lr_at(10) == pytest.approx(1e-3) and tr.lr_at(100) == pytest.approx(1e-4)


def test_loss_goes_down_on_real_digits():
    cfg = replace(CFG, steps=120, batch_size=32, lr=2e-3, log_every=1)
    tr = Trainer(DiT(get_config("mnist-tiny")), *small_data(256), cfg).run(progress=False)
    first = sum(h["loss"] for h in tr.history[:10]) / 10
    last = sum(h["loss"] for h in tr.history[-10:]) / 10
    assert last < 0.75 * first, (first, last)


def test_nan_loss_is_reported():
    tr = make_trainer(replace(CFG, lr=1e30, grad_clip=None))
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        tr.run(progress=False)


def test_bad_data_and_configs():
    x, y = small_data()
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        Trainer(DiT(get_config("mnist-tiny")), x, y, CFG)
    with pytest.raises(ValueError, match="larger than the dataset"):
        Trainer(DiT(get_config("mnist-tiny")), *small_data(), replace(CFG, batch_size=1000))
    for bad in (dict(lr=0), dict(objective="score"), dict(ema_decay=1.0), dict(steps=0)):
        with pytest.raises(ValueError, match="invalid TrainConfig"):
            TrainConfig(**bad)


def test_gradients_are_freed_at_the_end_of_every_step():
    """Stale gradients alive through the next forward would add a full copy of the weights to its peak memory."""
    tr = make_trainer(replace(CFG, steps=2))
    tr.train_step()
    assert all(p.grad is None for p in tr.model.parameters())
    code = ("import torch; from minidit.models import DiT, get_config; from minidit.train import TrainConfig, Trainer; "
            "from minidit.cost import peak_memory_bytes; torch.manual_seed(0); "
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


def test_resume_rejects_other_config(tmp_path):
    make_trainer().run(steps=1, progress=False, checkpoint_path=tmp_path / "s.safetensors")
    other = Trainer(DiT(get_config("mnist-tiny", depth=3)), *small_data(), CFG)
    from minidit.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="trained with config"):
        other.load(tmp_path / "s.safetensors")


DDP_SCRIPT = r"""
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_train import make_trainer, CFG
from minidit.models import save_model
tr = make_trainer(CFG).run(progress=False, checkpoint_path={ckpt!r})
"""


@pytest.mark.slow
def test_torchrun_ddp_equals_single_process(tmp_path):
    """2 CPU processes (gloo) on the same global batch reach the same weights as one process."""
    script = tmp_path / "ddp.py"
    ckpt = str(tmp_path / "ddp.safetensors")
    script.write_text(DDP_SCRIPT.format(tests=os.path.dirname(__file__), ckpt=ckpt))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    single = make_trainer(CFG).run(progress=False)
    from minidit.checkpoint import load_checkpoint

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
