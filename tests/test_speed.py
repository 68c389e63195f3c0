"""minidit.variants.speed: the CPU fast path (unfused attention for short sequences) against SDPA and the definition,
and the measuring tools (activation-memory model vs autograd's saved tensors and the profiler, MFU, timing)."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from reference import naive_attention

from minidit.attention import AttentionModule, AttentionRecorder, attention
from minidit.mmdit import MMDiTConfig
from minidit.models import DiT, get_config
from minidit.t2i import TextToImage, get_t2i_config
from minidit.train import TrainConfig, Trainer
from minidit.variants.attention import VariantAttention
from minidit.variants.speed import (
    CPU_UNFUSED_MAX_KEYS,
    FP32_SOFTMAX_BELOW_KEYS,
    dit_activation_bytes,
    dit_training_peak_bytes,
    matmul_peak,
    mfu,
    peak_memory_bytes,
    runs_unfused,
    saved_tensor_bytes,
    time_alternating,
    unfused_attention,
    use_fast_attention,
)


def randomized(m: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, std)
    return m


def on_fast_path(m: AttentionModule) -> bool:
    return getattr(m.attend, "__self__", None) is m and m.attend.__func__ is not AttentionModule.attend


# ---- the unfused path ------------------------------------------------------------------------------------------
def test_which_path_trains_where():
    """Unfused only on a CPU and only for short sequences (fp32 ≤ 64 keys, bf16 ≤ 512); SDPA everywhere else."""
    assert CPU_UNFUSED_MAX_KEYS == {torch.float32: 64, torch.bfloat16: 512}
    assert runs_unfused("cpu", torch.bfloat16, 512) and not runs_unfused("cpu", torch.bfloat16, 513)
    assert runs_unfused("cpu", torch.float32, 64) and not runs_unfused("cpu", torch.float32, 65)
    assert not runs_unfused("cpu", torch.float16, 16)
    assert not runs_unfused("cuda", torch.bfloat16, 16) and not runs_unfused(torch.device("cuda", 0), torch.float32, 4)


def test_unfused_attention_matches_the_definition_and_sdpa():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    for m in (None, mask, mask[:, None, None, :]):  # key padding (B, Tk) or a broadcastable (B, 1, 1, Tk) mask
        ref = naive_attention(q, k, v, None if m is None else mask)
        assert torch.allclose(unfused_attention(q, k, v, m), ref, atol=1e-5)
        assert torch.allclose(attention(q, k, v, m), ref, atol=1e-5)


@pytest.mark.parametrize("keys", [16, 300, 600])  # bf16: unfused, unfused, SDPA
def test_bf16_paths_match_fp32_sdpa_forward_and_backward(keys):
    """Under bf16 on a CPU, whichever path the fast path takes gives SDPA's fp32 output and gradients to bf16
    precision, with a key padding mask."""
    module = use_fast_attention(AttentionModule(32, 2))
    assert runs_unfused("cpu", torch.bfloat16, keys) == (keys <= 512)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g) for n in (9, keys, keys))
    mask = torch.ones(2, keys, dtype=torch.bool)
    mask[1, keys // 2:] = False
    grad_out = torch.randn(2, 2, 9, 16, generator=g)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, attn_mask=mask[:, None, None])
    ref.backward(grad_out)
    ins = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    out, w = module.attend(*ins, mask)
    assert out.dtype == torch.bfloat16 and w is None
    out.float().backward(grad_out)
    assert torch.allclose(out.float(), ref, atol=3e-2, rtol=3e-2)
    for a, b in zip(ins, ref_in):
        assert torch.allclose(a.grad.float(), b.grad, atol=5e-2, rtol=5e-2)


def test_short_bf16_rows_take_their_softmax_in_fp32():
    """Below FP32_SOFTMAX_BELOW_KEYS keys the unfused path runs softmax in fp32 (bf16's CPU kernel is slow on short
    rows): the same forward bits as a bf16 softmax, gradients as the fp32 softmax gives them; fp32 inputs unchanged."""
    g = torch.Generator().manual_seed(0)
    for keys in (16, FP32_SOFTMAX_BELOW_KEYS):
        q, k, v = (torch.randn(4, 2, n, 16, generator=g) for n in (keys, keys, keys))
        grad_out = torch.randn(4, 2, keys, 16, generator=g).to(torch.bfloat16)
        ins = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
        out = unfused_attention(*ins)
        out.backward(grad_out)
        for dtype in (torch.bfloat16, torch.float32):  # a bf16 softmax, then the fp32 route, written out
            ref_in = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
            scores = (ref_in[0] @ ref_in[1].transpose(-2, -1)) / 4.0
            ref = scores.softmax(-1, dtype=dtype).to(torch.bfloat16) @ ref_in[2]
            ref.backward(grad_out)
            assert torch.equal(out, ref)
            grads_equal = all(torch.equal(a.grad, b.grad) for a, b in zip(ins, ref_in))
            assert grads_equal == ((dtype == torch.float32) == (keys < FP32_SOFTMAX_BELOW_KEYS))
    q32 = torch.randn(2, 2, 16, 8, generator=g, requires_grad=True)
    ref32 = ((q32 @ q32.transpose(-2, -1)) / math.sqrt(8)).softmax(-1) @ q32
    assert torch.equal(unfused_attention(q32, q32, q32), ref32)


# ---- models on the fast path -----------------------------------------------------------------------------------
def _tiny_t2i(backbone: str) -> TextToImage:
    return TextToImage(get_t2i_config(f"shapes-{backbone}", input_size=16, patch_size=4, dim=32, depth=2,
                                      num_heads=2, text_dim=16, text_depth=1, text_heads=2))


def _case(name: str):
    """A model and its inputs: a DiT, a text DiT (cross-attention with padding) or an MMDiT (joint mask)."""
    if name == "dit":
        return DiT(get_config("mnist-p7")), (torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([3, 10]))
    ids = torch.tensor([5, 1188])  # a caption and the null caption (one real token: most of the text is padding)
    return _tiny_t2i(name.removeprefix("t2i-")), (torch.randn(2, 3, 16, 16), torch.rand(2), ids)


@pytest.mark.parametrize("name", ["dit", "t2i-dit", "t2i-mmdit"])
def test_fast_path_gives_the_sdpa_paths_outputs_and_gradients(name):
    plain, inputs = _case(name)
    randomized(plain)
    fast = use_fast_attention(copy.deepcopy(plain))
    attn = [m for m in fast.modules() if isinstance(m, AttentionModule)]
    assert attn and all(on_fast_path(m) for m in attn)
    assert not any(on_fast_path(m) for m in plain.modules() if isinstance(m, AttentionModule))
    for bf16, tol in ((False, 1e-5), (True, 2e-2)):  # bf16: relative to the norm (bf16 keeps 8 bits)
        outs, grads = [], []
        for model in (plain, fast):
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(*inputs)
            out.float().square().sum().backward()
            outs.append(out.detach().float())
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert (outs[0] - outs[1]).norm() <= tol * outs[0].norm()
        assert (grads[0] - grads[1]).norm() <= tol * grads[0].norm()


def test_fast_path_still_records_and_returns_weights():
    plain = randomized(DiT(get_config("mnist-tiny"))).eval()
    fast = use_fast_attention(copy.deepcopy(plain))
    x, t, y = torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([1, 2])
    with AttentionRecorder(plain) as want, AttentionRecorder(fast) as got:
        a, b = plain(x, t, y), fast(x, t, y)
    assert torch.allclose(a, b, atol=1e-5) and len(got.records) == len(want.records) == 2
    assert all(torch.allclose(w1, w2, atol=1e-6) for (_, w1), (_, w2) in zip(want.records, got.records))
    tokens = torch.randn(2, 49, 64)
    out, w = fast.blocks[0].attn(tokens, return_weights=True)
    assert w.shape == (2, 2, 49, 49) and torch.allclose(out, plain.blocks[0].attn(tokens), atol=1e-5)


def test_deepcopy_keeps_the_fast_path_bound_to_the_copy():
    """The Trainer's EMA is a deepcopy: its attention layers must run their own fast path (their own recorder)."""
    model = use_fast_attention(randomized(DiT(get_config("mnist-tiny"))))
    twin = copy.deepcopy(model)
    pairs = [(a, b) for a, b in zip(model.modules(), twin.modules()) if isinstance(a, AttentionModule)]
    assert pairs and all(on_fast_path(b) and b.attend.__self__ is b and b is not a for a, b in pairs)
    x, t, y = torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([1, 2])
    with AttentionRecorder(twin) as rec:  # bound to the original, the copy's layers would not see its recorder
        twin(x, t, y)
    assert [n for n, _ in rec.records] == ["blocks.0.attn", "blocks.1.attn"]
    trainer = Trainer(model, torch.randn(4, 1, 28, 28), torch.arange(4), TrainConfig(steps=1, batch_size=4))
    assert all(on_fast_path(m) and m.attend.__self__ is m for m in trainer.ema.modules()
               if isinstance(m, AttentionModule))


def test_fast_path_keeps_alibi():
    """ALiBi adds its bias in VariantAttention.attend: the fast path must not replace it by plain attention."""
    attn = randomized(VariantAttention(16, 4, (3, 4), alibi="euclidean"), 0.3)
    x = torch.randn(2, 12, 16)
    want = attn(x)
    use_fast_attention(attn)
    assert torch.allclose(attn(x), want, atol=1e-6)


# ---- the activation-memory model -------------------------------------------------------------------------------
def _saved(cfg, B: int, bf16: bool, ckpt: bool = False, fast: bool = True) -> int:
    """Bytes autograd saves in one training forward of a fresh DiT (on the fast path unless fast=False)."""
    model = DiT(cfg).train()
    model.grad_checkpointing = ckpt
    if fast:
        use_fast_attention(model)
    x, t, y = torch.randn(B, 1, 28, 28), torch.rand(B), torch.randint(0, 10, (B,))

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(x, t, y)

    return saved_tensor_bytes(forward, model.parameters())


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("ckpt", [False, True])
def test_activation_model_matches_saved_tensors(bf16, ckpt):
    cfg, B = get_config("mnist-s2", depth=3), 8
    assert dit_activation_bytes(cfg, B, bf16, ckpt) == pytest.approx(_saved(cfg, B, bf16, ckpt), rel=0.15)


@pytest.mark.parametrize("name, bf16", [("mnist-p7", False), ("mnist-p7", True), ("mnist-s2", True)])
def test_plain_dit_uses_sdpa_and_the_fast_path_adds_exactly_the_attention_weights(name, bf16):
    """A DiT off the fast path trains with SDPA on a CPU too (a log-sum-exp per head and query, no T×T matrix);
    the fast path keeps each head's T×T weights instead (6 bytes a weight for short bf16 rows: fp32 softmax output
    and its bf16 copy). The model's CPU − GPU difference is that exactly, and so is the measured difference."""
    cfg, B = get_config(name, depth=2), 4
    T, H, L = cfg.num_tokens, cfg.num_heads, cfg.depth
    per_weight = (6 if T < FP32_SOFTMAX_BELOW_KEYS else 2) if bf16 else 4
    weights_minus_lse = L * B * H * T * (per_weight * T - 4)
    cpu, gpu = dit_activation_bytes(cfg, B, bf16), dit_activation_bytes(cfg, B, bf16, device="cuda")
    assert cpu - gpu == weights_minus_lse
    plain, fast = _saved(cfg, B, bf16, fast=False), _saved(cfg, B, bf16)
    assert fast - plain == weights_minus_lse
    assert gpu == pytest.approx(plain, rel=0.15)  # the SDPA model describes the plain DiT


def test_activation_model_of_fp32_long_sequences_is_sdpa_everywhere():
    cfg, B = get_config("mnist-s2", depth=3), 8  # 196 keys > 64: SDPA even on the fast path
    assert dit_activation_bytes(cfg, B) == dit_activation_bytes(cfg, B, device="cuda")
    assert _saved(cfg, 2, False) == _saved(cfg, 2, False, fast=False)


def test_activation_model_counts_the_fp32_softmax_of_short_bf16_rows():
    """Under bf16 on a CPU, fewer than 32 keys run their softmax in fp32: each head keeps the fp32 weights and their
    bf16 copy (6 bytes a weight), and the model then matches what autograd saves within 2 %."""
    cfg, B = get_config("mnist-p7"), 8
    T, H = cfg.num_tokens, cfg.num_heads
    cpu, gpu = dit_activation_bytes(cfg, B, bf16=True), dit_activation_bytes(cfg, B, bf16=True, device="cuda")
    assert cpu - gpu == cfg.depth * B * H * T * (6 * T - 4)
    assert cpu == pytest.approx(_saved(cfg, B, bf16=True), rel=0.02)


def test_activation_model_validates():
    with pytest.raises(TypeError, match="DiTConfig"):
        dit_activation_bytes(MMDiTConfig().to_dict())
    with pytest.raises(ValueError, match="batch"):
        dit_activation_bytes(get_config("mnist-tiny"), 0)


def test_training_peak_model_matches_profiler():
    cfg = get_config("mnist-s4", depth=3)
    model = use_fast_attention(DiT(cfg).train())  # 49 fp32 keys: the fast path runs unfused
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
    assert dit_training_peak_bytes(cfg, B, grad_checkpointing=True) == pytest.approx(saved, rel=0.25)


# ---- the measuring tools ---------------------------------------------------------------------------------------
def test_saved_tensor_bytes_counts_each_storage_once_and_leaves_out_parameters():
    w = torch.randn(100, 100, requires_grad=True)
    x = torch.randn(10, 100, requires_grad=True)

    def fn():
        h = x @ w  # saves x and w
        return (h * h).sum()  # saves h (twice: once by storage)

    assert saved_tensor_bytes(fn) == (100 * 100 + 10 * 100 + 10 * 100) * 4
    assert saved_tensor_bytes(fn, exclude=[w]) == (10 * 100 + 10 * 100) * 4


def test_peak_memory_sees_a_known_allocation():
    def fn():
        a = torch.ones(2_000_000)  # 8 MB
        b = a * 2  # another 8 MB while a is alive
        del a, b

    peak = peak_memory_bytes(fn)
    assert 16e6 <= peak < 17e6


def test_peak_memory_keeps_the_profilers_log_lines_out_of_stderr():
    """Kineto would print "profiler_start"/"profiler_stop" (and a failed GPU probe) on every call: notebook noise."""
    code = ("import torch; from minidit.variants.speed import peak_memory_bytes; "
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


def test_time_alternating_runs_in_alternating_rounds():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = time_alternating(fns, rounds=3, calls=2)
    assert calls == list("abc") + list("aabbcc") + list("ccbbaa") + list("aabbcc")  # warm-up, then A B C, C B A, …
    assert set(times) == set("abc") and all(len(v) == 3 and min(v) >= 0 for v in times.values())
    for bad in [dict(fns={}), dict(fns=fns, rounds=0), dict(fns=fns, calls=0)]:
        with pytest.raises(ValueError):
            time_alternating(**bad)
