"""Device tests: the package on a CUDA GPU (skipped without one). Run them with `pytest -m cuda tests/test_device.py`
or through benchmarks/gpu_check.py. References are the same computations on the CPU (fp32, TF32 off)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from minidit.checkpoint import load_checkpoint
from minidit.ddpm import DDPMSchedule
from minidit.metrics import MnistClassifier
from minidit.models import DiT, DiTConfig, get_config
from minidit.sampling import sample
from minidit.train import TrainConfig, Trainer
from minidit.vae import VAE, VAEConfig
from minidit.variants.attention import VariantConfig, VariantDiT

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CUDA = torch.device("cuda")
CFG = TrainConfig(steps=40, batch_size=32, lr=2e-3, warmup_steps=5, ema_decay=0.9, log_every=1, seed=1)


@pytest.fixture(autouse=True)
def _exact_fp32():
    """Compare against the CPU in true fp32 (no TF32 matmuls)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def toy_data(n: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-dependent blobs in [−1, 1] (no dataset files on a GPU machine are needed)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    grid = torch.linspace(-1, 1, 28)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    cx, cy = (y % 5).float() / 2 - 1, (y // 5).float() - 0.5
    blob = torch.exp(-((xx - cx[:, None, None]) ** 2 + (yy - cy[:, None, None]) ** 2) / 0.1)
    x = (2 * blob - 1 + 0.05 * torch.randn(n, 28, 28, generator=g)).clamp(-1, 1)
    return x[:, None], y


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("attn", [None, dict(n_kv_heads=2), dict(rope=True), dict(alibi="euclidean"),
                                  dict(window=7, global_tokens=4), "text"])
def test_dit_forward_backward_on_cuda_matches_cpu(attn):
    """DiT (class labels or a text DiT's pooled vector + context), and the attention variants built on it."""
    sizes = dict(patch_size=2, dim=64, depth=2, num_heads=4)
    args = [torch.randn(4, 1, 28, 28), torch.rand(4), torch.tensor([0, 3, 9, 10])]  # 10: a dropped (null) label
    if attn is None:
        cpu = randomized(DiT(DiTConfig(**sizes)))
    elif attn == "text":
        cpu = randomized(DiT(DiTConfig(**sizes, context_dim=12, pooled_dim=8)))
        args = [*args[:2], torch.randn(4, 8), torch.randn(4, 5, 12), torch.tensor([[True] * 5, [True] * 2 + [False] * 3,
                                                                                   [True] * 5, [True] * 5])]
    else:
        cpu = randomized(VariantDiT(VariantConfig(**sizes, **attn)))
    gpu = type(cpu)(cpu.config).to(CUDA)
    gpu.load_state_dict(cpu.state_dict())
    out_cpu = cpu(*args)
    out_gpu = gpu(*(a.to(CUDA) for a in args))
    assert out_gpu.device.type == CUDA.type
    assert torch.allclose(out_gpu.cpu(), out_cpu, atol=1e-4)
    out_cpu.square().mean().backward()
    out_gpu.square().mean().backward()
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters()):
        assert torch.allclose(p_gpu.grad.cpu(), p_cpu.grad, atol=1e-4, rtol=1e-3), name


def test_bf16_autocast_on_cuda_is_close_to_fp32():
    model = randomized(DiT(get_config("mnist-s4"))).to(CUDA).eval()
    x, t, y = torch.randn(8, 1, 28, 28, device=CUDA), torch.rand(8, device=CUDA), torch.arange(8, device=CUDA)
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(x, t, y)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_bf16_residual_stream_on_cuda():
    """Under bf16 autocast the patch tokens and the residual stream stay bf16 (the position table follows them)."""
    model = randomized(DiT(get_config("mnist-s4"))).to(CUDA).eval()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    x, t, y = torch.randn(2, 1, 28, 28, device=CUDA), torch.rand(2, device=CUDA), torch.arange(2, device=CUDA)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(x, t, y)
    assert seen == [torch.bfloat16]


@pytest.mark.parametrize("bf16", [False, True])
def test_training_on_cuda_learns_and_checkpoints(tmp_path, bf16):
    torch.manual_seed(0)
    x, y = toy_data()
    tr = Trainer(DiT(get_config("mnist-tiny")), x.to(CUDA), y.to(CUDA), replace(CFG, bf16=bf16))
    assert next(tr.model.parameters()).device.type == next(tr.ema.parameters()).device.type == CUDA.type
    tr.run(progress=False, checkpoint_path=tmp_path / "s.safetensors")
    first = sum(h["loss"] for h in tr.history[:5]) / 5
    last = sum(h["loss"] for h in tr.history[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    tensors, meta = load_checkpoint(tmp_path / "s.safetensors", kind="train-state")
    assert meta["step"] == CFG.steps and all(v.device.type == "cpu" for v in tensors.values())


def test_cuda_training_matches_cpu_training():
    """Same seed, same batches: a few fp32 steps on the GPU follow the CPU's losses and weights (TF32 off).

    (AdamW divides by √v: a gradient that is 1e-9 on one device and 0 on the other moves a weight by up to lr,
    hence the loose weight tolerance.)"""
    x, y = toy_data(64)
    cfg = replace(CFG, steps=5, batch_size=16)
    torch.manual_seed(0)
    cpu = Trainer(DiT(get_config("mnist-tiny")), x, y, cfg).run(progress=False)
    torch.manual_seed(0)
    gpu = Trainer(DiT(get_config("mnist-tiny")), x.to(CUDA), y.to(CUDA), cfg).run(progress=False)
    assert [h["loss"] for h in gpu.history] == pytest.approx([h["loss"] for h in cpu.history], rel=1e-3)
    for (name, a), b in zip(cpu.model.state_dict().items(), gpu.model.state_dict().values()):
        assert torch.allclose(b.cpu(), a, atol=cfg.steps * cfg.lr), name


@pytest.mark.parametrize("sampler", ["euler", "heun", "ddim", "ancestral"])
def test_sampling_on_cuda_matches_cpu(sampler):
    """The one sampling loop on a GPU model: CPU noise and CPU labels are moved to it; the ancestral sampler's
    draws come from the same CPU generator, so the chains agree."""
    model = randomized(DiT(get_config("mnist-tiny"))).eval()
    noise = torch.randn(6, 1, 28, 28)
    labels = torch.arange(6)
    kw = dict(steps=4, sampler=sampler, cfg_scale=2.0, schedule=DDPMSchedule(), noise=noise)
    on_cpu = sample(model, labels, generator=torch.Generator().manual_seed(1), **kw)
    on_gpu = sample(model.to(CUDA), labels, generator=torch.Generator().manual_seed(1), **kw)
    assert on_gpu.device.type == CUDA.type and torch.isfinite(on_gpu).all()
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-3)


@pytest.mark.parametrize("sampler", ["euler", "ancestral"])
def test_sampling_with_a_cuda_generator(sampler):
    """A generator on the GPU draws the initial noise there (and the ancestral sampler's noise too)."""
    model = randomized(DiT(get_config("mnist-tiny"))).to(CUDA).eval()
    kw = dict(steps=3, sampler=sampler, schedule=DDPMSchedule())
    a = sample(model, torch.arange(4), generator=torch.Generator(CUDA).manual_seed(3), **kw)
    b = sample(model, torch.arange(4), generator=torch.Generator(CUDA).manual_seed(3), **kw)
    assert a.device.type == CUDA.type and torch.equal(a, b)


@pytest.mark.parametrize("objective", ["vae", "classifier", "ddpm"])
def test_every_objective_trains_on_cuda_and_resumes_exactly(tmp_path, objective):
    """The GPU path (batches drawn ahead by a helper thread) with each objective: a resumed run equals an
    uninterrupted one."""
    x, y = toy_data(64)
    cfg = replace(CFG, steps=4, batch_size=16, objective=objective)

    def make():
        torch.manual_seed(0)
        model = {"vae": lambda: VAE(VAEConfig(base_channels=8, max_channels=16)), "classifier": MnistClassifier,
                 "ddpm": lambda: DiT(get_config("mnist-tiny"))}[objective]()
        return Trainer(model, x.to(CUDA), None if objective == "vae" else y.to(CUDA), cfg)

    full = make().run(progress=False)
    assert full.pool is not None
    make().run(steps=2, progress=False, checkpoint_path=tmp_path / "s.safetensors")
    resumed = make().load(tmp_path / "s.safetensors").run(progress=False)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_compiled_model_matches_eager_on_cuda():
    model = randomized(DiT(get_config("mnist-tiny"))).to(CUDA).eval()
    compiled = torch.compile(model)
    x, t, y = torch.randn(4, 1, 28, 28, device=CUDA), torch.rand(4, device=CUDA), torch.arange(4, device=CUDA)
    with torch.no_grad():
        assert torch.allclose(compiled(x, t, y), model(x, t, y), atol=1e-4)


def test_compiled_training_step_with_cuda_graphs_follows_eager():
    """TrainConfig(compile=True, compile_mode="reduce-overhead"): the step runs as CUDA graphs and its losses follow
    the eager step's on the same batches (same seed)."""
    x, y = toy_data()
    losses = {}
    for mode in (None, "reduce-overhead"):
        torch.manual_seed(0)
        cfg = replace(CFG, steps=6, compile=mode is not None, compile_mode=mode or "default")
        tr = Trainer(DiT(get_config("mnist-tiny")), x.to(CUDA), y.to(CUDA), cfg)
        losses[mode] = [tr.train_step() for _ in range(cfg.steps)]
    assert all(math.isfinite(v) for v in losses["reduce-overhead"])
    assert losses["reduce-overhead"] == pytest.approx(losses[None], rel=2e-2, abs=1e-3)


NCCL_SCRIPT = r"""
import sys, torch
from dataclasses import replace
sys.path.insert(0, {tests!r})
from test_device import CFG, toy_data
from minidit.models import DiT, get_config
from minidit.train import Trainer
rank = int(__import__("os").environ["LOCAL_RANK"])
torch.cuda.set_device(rank)
torch.manual_seed(0)
x, y = toy_data(64)
dev = torch.device("cuda", rank)
tr = Trainer(DiT(get_config("mnist-tiny")), x.to(dev), y.to(dev), replace(CFG, steps=5, batch_size=16))
assert tr.world == 2, tr.world
tr.run(progress=False, checkpoint_path={ckpt!r})
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over NCCL needs 2 GPUs")
def test_nccl_ddp_equals_single_process(tmp_path):
    script, ckpt = tmp_path / "ddp.py", str(tmp_path / "ddp.safetensors")
    script.write_text(NCCL_SCRIPT.format(tests=os.path.dirname(__file__), ckpt=ckpt))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    x, y = toy_data(64)
    torch.manual_seed(0)
    single = Trainer(DiT(get_config("mnist-tiny")), x.to(CUDA), y.to(CUDA),
                     replace(CFG, steps=5, batch_size=16)).run(progress=False)
    tensors, meta = load_checkpoint(ckpt, kind="train-state")
    assert meta["step"] == 5
    for k, v in single.model.state_dict().items():
        assert torch.allclose(tensors[f"model.{k}"], v.cpu(), atol=1e-4), k
