import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minidit.attention import (
    CPU_UNFUSED_MAX_KEYS,
    FP32_SOFTMAX_BELOW_KEYS,
    Attention,
    CrossAttention,
    QKNorm,
    attention,
    runs_unfused,
)


def naive_attention(q, k, v, mask=None):
    """Per-batch, per-head loop: the definition, written independently of the package."""
    B, H, Tq, d = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            s = q[b, h] @ k[b, h].T / math.sqrt(d)
            if mask is not None:
                s = s.masked_fill(~mask[b][None, :], float("-inf"))
            out[b, h] = torch.softmax(s, -1) @ v[b, h]
    return out


@pytest.mark.parametrize("keys", [7, 80])  # fp32 on a CPU: 7 keys run unfused, 80 run SDPA
def test_sdpa_and_explicit_paths_agree_and_match_definition(keys):
    assert runs_unfused("cpu", torch.float32, keys) == (keys <= CPU_UNFUSED_MAX_KEYS[torch.float32])
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, keys, 8), torch.randn(2, 3, keys, 8)
    mask = torch.ones(2, keys, dtype=torch.bool)
    mask[1, 4:] = False
    for m in (None, mask):
        fast = attention(q, k, v, m)
        slow, w = attention(q, k, v, m, return_weights=True)
        ref = naive_attention(q, k, v, m)
        assert torch.allclose(fast, slow, atol=1e-5) and torch.allclose(slow, ref, atol=1e-5)
        assert w.shape == (2, 3, 5, keys) and torch.allclose(w.sum(-1), torch.ones(2, 3, 5))
    _, w = attention(q, k, v, mask, return_weights=True)
    assert (w[1, :, :, 4:] == 0).all()


def test_which_path_trains_where():
    """Unfused only on a CPU and only for short sequences (fp32 ≤ 64 keys, bf16 ≤ 512); SDPA everywhere else."""
    assert runs_unfused("cpu", torch.bfloat16, 512) and not runs_unfused("cpu", torch.bfloat16, 513)
    assert runs_unfused("cpu", torch.float32, 64) and not runs_unfused("cpu", torch.float32, 65)
    assert not runs_unfused("cpu", torch.float16, 16)
    assert not runs_unfused("cuda", torch.bfloat16, 16) and not runs_unfused(torch.device("cuda", 0), torch.float32, 4)


@pytest.mark.parametrize("keys", [16, 300, 600])  # bf16: unfused, unfused, SDPA
def test_bf16_paths_match_fp32_sdpa_forward_and_backward(keys):
    """Under bf16 autocast on a CPU, whichever path runs gives SDPA's fp32 output and gradients to bf16 precision,
    with a key padding mask and an additive bias (the ALiBi route)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g) for n in (9, keys, keys))
    mask = torch.ones(2, keys, dtype=torch.bool)
    mask[1, keys // 2:] = False
    bias = -torch.rand(2, 9, keys, generator=g)
    grad_out = torch.randn(2, 2, 9, 16, generator=g)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, attn_mask=bias.masked_fill(~mask[:, None, None], float("-inf")))
    ref.backward(grad_out)
    ins = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    out = attention(*ins, mask, bias=bias)
    assert out.dtype == torch.bfloat16
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
        out = attention(*ins)
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
    assert torch.equal(attention(q32, q32, q32), ref32)


def test_self_attention_matches_torch_multihead_attention():
    D, H = 16, 4
    ours = Attention(D, H)
    ref = nn.MultiheadAttention(D, H, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight)
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.proj.weight)
        ref.out_proj.bias.copy_(ours.proj.bias)
    x = torch.randn(3, 10, D)
    want, want_w = ref(x, x, x, average_attn_weights=False)
    out, w = ours(x, return_weights=True)
    assert torch.allclose(out, want, atol=1e-5) and torch.allclose(w, want_w, atol=1e-5)
    assert torch.allclose(ours(x), want, atol=1e-5)


def test_cross_attention_own_context_width_and_padding_mask():
    ca = CrossAttention(dim=16, context_dim=24, num_heads=2)
    x, ctx = torch.randn(2, 9, 16), torch.randn(2, 6, 24)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    out = ca(x, ctx, mask)
    assert out.shape == (2, 9, 16)
    ctx2 = ctx.clone()
    ctx2[1, 3:] = torch.randn(3, 24) * 100  # change only padded tokens
    assert torch.allclose(ca(x, ctx2, mask), out, atol=1e-6)
    ctx2[1, 0] += 1  # a real token does matter
    assert not torch.allclose(ca(x, ctx2, mask), out, atol=1e-4)
    out_w, w = ca(x, ctx, mask, return_weights=True)
    assert torch.allclose(out_w, out, atol=1e-5) and (w[1, :, :, 3:] == 0).all()


def test_cross_attention_matches_multihead_attention_with_kdim():
    ca = CrossAttention(16, 24, 2)
    ref = nn.MultiheadAttention(16, 2, batch_first=True, kdim=24, vdim=24)
    with torch.no_grad():
        ref.q_proj_weight.copy_(ca.q.weight)
        ref.k_proj_weight.copy_(ca.kv.weight[:16])
        ref.v_proj_weight.copy_(ca.kv.weight[16:])
        ref.in_proj_bias.copy_(torch.cat([ca.q.bias, ca.kv.bias]))
        ref.out_proj.weight.copy_(ca.proj.weight)
        ref.out_proj.bias.copy_(ca.proj.bias)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 4, 24)
    pad = torch.tensor([[False] * 4, [False, False, True, True]])  # torch: True = ignore
    want, _ = ref(x, ctx, ctx, key_padding_mask=pad)
    assert torch.allclose(ca(x, ctx, ~pad), want, atol=1e-5)


def test_mask_errors():
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="at least one unmasked key"):
        attention(q, q, q, torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be bool"):
        attention(q, q, q, torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"\(B, T_key\)"):
        attention(q, q, q, torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="context must be"):
        CrossAttention(8, 12, 2)(torch.randn(1, 3, 8), torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="not divisible"):
        Attention(10, 4)


def test_qk_norm_is_rmsnorm_and_runs_bf16_without_the_dtype_mismatch_warning():
    ref, qk = nn.RMSNorm(8, eps=1e-6), QKNorm(8)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    qk.load_state_dict(ref.state_dict())  # same parameters, same names
    x = torch.randn(2, 3, 5, 8, requires_grad=True)
    assert torch.equal(qk(x), ref(x))  # fp32: identical
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nn.RMSNorm warns here: bf16 input, fp32 weight
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = qk(x.bfloat16())
        y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and qk.weight.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), ref(x).detach(), atol=3e-2, rtol=2e-2)


def test_qk_norm_normalises_each_head():
    a = Attention(16, 2, qk_norm=True)
    assert isinstance(a.q_norm, nn.RMSNorm) and a.q_norm.normalized_shape == (8,)
    x = torch.randn(1, 4, 16)
    out, w = a(x, return_weights=True)
    assert torch.allclose(a(x), out, atol=1e-5)
