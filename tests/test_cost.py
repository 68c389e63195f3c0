"""The cost model (minidit.cost) against independent counts: torch's FlopCounterMode on the explicit attention path,
autograd's saved tensors, the profiler's allocations, and closed-form MFU arithmetic."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minidit.attention import _Recordable
from minidit.cost import (
    dit_activation_bytes,
    dit_cost_at,
    dit_flops,
    dit_training_peak_bytes,
    matmul_peak,
    mfu,
    mmdit_flops,
    peak_memory_bytes,
    saved_tensor_bytes,
    train_flops_per_image,
)
from minidit.mmdit import MMDiT, MMDiTConfig
from minidit.models import DiT, DiTConfig, get_config


def explicit_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Route every attention through the explicit q·kᵀ / weights·v matmuls, which FlopCounterMode counts
    (it has no formula for the CPU flash-attention kernel)."""
    for m in model.modules():
        if isinstance(m, _Recordable):
            m.recorder = types.SimpleNamespace(add=lambda module, weights: None)
    return model


def counted_flops(fn, monkeypatch=None) -> int:
    """Matmul FLOPs of fn() by FlopCounterMode, plus 4·Tq·Tk·d per batch·head for every SDPA call (FlopCounterMode
    has no formula for the CPU flash kernel: the shapes of each actual call are counted instead)."""
    sdpa_flops = []
    if monkeypatch is not None:
        import minidit.attention

        sdpa = minidit.attention.F.scaled_dot_product_attention

        def counting_sdpa(q, k, v, *args, **kwargs):
            sdpa_flops.append(4 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1])
            return sdpa(q, k, v, *args, **kwargs)

        monkeypatch.setattr(minidit.attention.F, "scaled_dot_product_attention", counting_sdpa)
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() + sum(sdpa_flops)


@pytest.mark.parametrize("cfg", [
    get_config("mnist-s4"),
    DiTConfig(input_size=16, in_channels=4, patch_size=2, dim=48, depth=2, num_heads=4, learn_sigma=True),
    DiTConfig(patch_size=2, dim=32, depth=2, num_heads=4, attn=dict(n_kv_heads=2)),
    DiTConfig(patch_size=2, dim=32, depth=2, num_heads=4, attn=dict(window=7, global_tokens=4)),
])
def test_dit_flops_equal_counted_matmul_flops(cfg, monkeypatch):
    model = DiT(cfg).eval()
    B = 3
    x, t, y = torch.randn(B, cfg.in_channels, cfg.input_size, cfg.input_size), torch.rand(B), torch.tensor([0, 1, 2])
    with torch.no_grad():
        assert counted_flops(lambda: model(x, t, y), monkeypatch) == B * dit_flops(cfg)
        explicit_attention(model)  # the explicit path's q·kᵀ and weights·v matmuls count the same
        if not cfg.attn or not cfg.attn.get("window"):  # (shown tiled attention is a dense masked matrix)
            assert counted_flops(lambda: model(x, t, y)) == B * dit_flops(cfg)


def test_windowed_attention_costs_its_window_not_the_image(monkeypatch):
    cfg = DiTConfig(patch_size=2, dim=32, depth=2, num_heads=4, attn=dict(window=7, global_tokens=4))
    full = DiTConfig(patch_size=2, dim=32, depth=2, num_heads=4)
    model = DiT(cfg).eval()
    with torch.no_grad():
        got = counted_flops(lambda: model(torch.randn(1, 1, 28, 28), torch.rand(1), torch.tensor([3])), monkeypatch)
    assert got == dit_flops(cfg) < dit_flops(full)  # 49 + 4 keys per query instead of 196


def test_mmdit_flops_equal_counted_matmul_flops():
    cfg = MMDiTConfig(input_size=28, in_channels=1, patch_size=4, dim=64, depth=3, num_heads=4, context_dim=32,
                      pooled_dim=24)
    model = explicit_attention(MMDiT(cfg).eval())
    B, L = 2, 5
    with torch.no_grad():
        got = counted_flops(lambda: model(torch.randn(B, 1, 28, 28), torch.rand(B), torch.randn(B, L, 32),
                                          torch.randn(B, 24)))
    assert got == B * mmdit_flops(cfg, L)


def test_training_is_three_forwards():
    cfg = get_config("mnist-tiny")
    model = explicit_attention(DiT(cfg).train())
    x, t, y = torch.randn(4, 1, 28, 28), torch.rand(4), torch.arange(4)
    total = counted_flops(lambda: model(x, t, y).square().mean().backward())
    assert total / (4 * dit_flops(cfg)) == pytest.approx(3.0, rel=0.02)
    assert train_flops_per_image(cfg) == 3 * dit_flops(cfg)


def test_dit_xl2_matches_the_paper():
    """DiT Table 4: XL/2 at 256² is 118.6 Gflops (multiply-adds)."""
    assert dit_flops(get_config("DiT-XL/2")) / 2 / 1e9 == pytest.approx(118.6, abs=0.1)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("ckpt", [False, True])
def test_activation_model_matches_saved_tensors(bf16, ckpt):
    cfg = get_config("mnist-s2", depth=3)
    model = DiT(cfg).train()
    model.grad_checkpointing = ckpt
    B = 8
    x, t, y = torch.randn(B, 1, 28, 28), torch.rand(B), torch.randint(0, 10, (B,))

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(x, t, y)

    measured = saved_tensor_bytes(forward, model.parameters())
    assert dit_activation_bytes(cfg, B, bf16, ckpt) == pytest.approx(measured, rel=0.15)


def test_activation_model_counts_attention_weights_only_where_attention_runs_unfused():
    """bf16 on a CPU keeps each head's T×T weights (minidit.attention.runs_unfused); on a GPU SDPA keeps a
    log-sum-exp per head and query instead."""
    cfg, B = get_config("mnist-s2", depth=3), 8
    T, H = cfg.num_tokens, cfg.num_heads
    cpu, gpu = dit_activation_bytes(cfg, B, bf16=True), dit_activation_bytes(cfg, B, bf16=True, device="cuda")
    assert cpu - gpu == cfg.depth * B * H * T * (2 * T - 4)
    assert dit_activation_bytes(cfg, B) == dit_activation_bytes(cfg, B, device="cuda")  # fp32 at 196 keys: SDPA


def test_activation_model_counts_the_fp32_softmax_of_short_bf16_rows():
    """Under bf16 on a CPU, fewer than 32 keys run their softmax in fp32 (minidit.attention): each head keeps the fp32
    weights and their bf16 copy (6 bytes a weight), and the model then matches what autograd saves within 2 %."""
    cfg, B = get_config("mnist-p7"), 8
    T, H = cfg.num_tokens, cfg.num_heads
    cpu, gpu = dit_activation_bytes(cfg, B, bf16=True), dit_activation_bytes(cfg, B, bf16=True, device="cuda")
    assert cpu - gpu == cfg.depth * B * H * T * (6 * T - 4)
    model = DiT(cfg).train()
    x, t, y = torch.randn(B, 1, 28, 28), torch.rand(B), torch.randint(0, 10, (B,))

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x, t, y)

    assert cpu == pytest.approx(saved_tensor_bytes(forward, model.parameters()), rel=0.02)


def test_training_peak_model_matches_profiler():
    cfg = get_config("mnist-s4", depth=3)
    model = DiT(cfg).train()
    B = 16
    x, t, y = torch.randn(B, 1, 28, 28), torch.rand(B), torch.randint(0, 10, (B,))

    def step():
        model(x, t, y).square().mean().backward()

    step()
    model.zero_grad(set_to_none=True)
    measured = peak_memory_bytes(step)
    assert dit_training_peak_bytes(cfg, B) == pytest.approx(measured, rel=0.15)
    model.zero_grad(set_to_none=True)
    model.grad_checkpointing = True
    saved = peak_memory_bytes(step)
    assert saved < 0.6 * measured  # checkpointing trades memory for a second forward


def test_peak_memory_sees_a_known_allocation():
    def fn():
        a = torch.ones(2_000_000)  # 8 MB
        b = a * 2  # another 8 MB while a is alive
        del a, b

    peak = peak_memory_bytes(fn)
    assert 16e6 <= peak < 17e6


def test_peak_memory_keeps_the_profilers_log_lines_out_of_stderr():
    """Kineto would print "profiler_start"/"profiler_stop" (and a failed GPU probe) on every call: notebook noise."""
    code = ("import torch; from minidit.cost import peak_memory_bytes; "
            "print(peak_memory_bytes(lambda: torch.ones(1000) * 2))")
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}  # a fresh process: kineto not started
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) >= 4000
    assert "profiler_st" not in run.stderr and "gpuGetDeviceCount" not in run.stderr, run.stderr


def test_mfu_arithmetic_and_validation():
    assert mfu(100.0, 1e9, 2e11) == pytest.approx(0.5)
    assert mfu(0.0, 1e9, 1e12) == 0.0
    for bad in [(-1.0, 1e9, 1e12), (1.0, 0, 1e12), (1.0, 1e9, 0), (float("nan"), 1e9, 1e12)]:
        with pytest.raises(ValueError):
            mfu(*bad)


def test_matmul_peak_is_a_plausible_rate():
    rate = matmul_peak(torch.float32, n=128, seconds=0.02, repeats=1)
    assert 1e8 < rate < 1e14
    with pytest.raises(ValueError, match="dtype"):
        matmul_peak(torch.int32)


def test_cost_at_resolution_latent_and_patch():
    xl = get_config("DiT-XL/2")
    latent = dit_cost_at(xl, 256, latent_factor=8, patch_size=2)
    assert latent["tokens"] == 256 and latent["gflops"] == pytest.approx(dit_flops(xl) / 1e9)
    pixels = dit_cost_at(xl, 256, latent_factor=1, patch_size=2)
    assert pixels["tokens"] == 128**2  # 64× the tokens of the latent model
    assert pixels["attention_share"] > 0.5 > latent["attention_share"]  # quadratic attention takes over
    big = dit_cost_at(xl, 1024, latent_factor=8, patch_size=2)
    assert big["tokens"] == 16 * latent["tokens"] and big["gflops"] > 16 * latent["gflops"]
    assert big["activation_mb"] == pytest.approx(16 * latent["activation_mb"], rel=0.01)
    with pytest.raises(ValueError, match="divisible"):
        dit_cost_at(xl, 250, latent_factor=8)
