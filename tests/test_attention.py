import warnings

import pytest
import torch
import torch.nn.functional as F
from reference import naive_attention
from torch import nn

from minidit.attention import (
    Attention,
    AttentionModule,
    AttentionRecorder,
    CrossAttention,
    QKNorm,
    attention,
    merge_heads,
    split_heads,
)
from minidit.models import DiT, DiTConfig


@pytest.mark.parametrize("keys", [7, 80])
def test_sdpa_and_explicit_paths_agree_and_match_definition(keys):
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
    full = torch.ones(2, 3, 5, keys, dtype=torch.bool)  # a broadcastable (B, H, Tq, Tk) mask works too
    full[1, :, :, 4:] = False
    assert torch.allclose(attention(q, k, v, full), naive_attention(q, k, v, mask), atol=1e-5)


def test_explicit_path_takes_its_softmax_in_fp32():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    out, w = attention(q, k, v, return_weights=True)
    scores = (q @ k.transpose(-2, -1)).float() / 4.0  # bf16 matmul, fp32 from the scores on
    want_w = scores.softmax(-1).to(torch.bfloat16)
    assert w.dtype == out.dtype == torch.bfloat16
    assert torch.equal(w, want_w) and torch.equal(out, want_w @ v)


@pytest.mark.parametrize("keys", [16, 300])
def test_bf16_paths_match_fp32_sdpa_forward_and_backward(keys):
    """In bf16 both paths give fp32 SDPA's output and gradients to bf16 precision, with a key padding mask."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g) for n in (9, keys, keys))
    mask = torch.ones(2, keys, dtype=torch.bool)
    mask[1, keys // 2:] = False
    grad_out = torch.randn(2, 2, 9, 16, generator=g)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, attn_mask=mask[:, None, None])
    ref.backward(grad_out)
    for return_weights in (False, True):
        ins = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
        out = attention(*ins, mask, return_weights=return_weights)
        out = out[0] if return_weights else out
        assert out.dtype == torch.bfloat16
        out.float().backward(grad_out)
        assert torch.allclose(out.float(), ref, atol=3e-2, rtol=3e-2)
        for a, b in zip(ins, ref_in):
            assert torch.allclose(a.grad.float(), b.grad, atol=5e-2, rtol=5e-2)


def test_split_and_merge_heads_are_inverse_and_head_major():
    x = torch.randn(2, 5, 12)
    h = split_heads(x, 3)
    assert h.shape == (2, 3, 5, 4) and torch.equal(h[:, 1], x[..., 4:8])  # head 1 = features 4…7
    assert torch.equal(merge_heads(h), x)


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
    assert Attention(D, H, qkv_bias=False).qkv.bias is None


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


def test_heads_must_divide_the_width():
    with pytest.raises(ValueError, match="dim 10 is not divisible by num_heads 4"):
        Attention(10, 4)
    with pytest.raises(ValueError, match="not divisible"):
        CrossAttention(10, 8, 3)


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


def test_qk_norm_normalises_each_head_of_q_and_k():
    a = Attention(16, 2, qk_norm=True)
    assert isinstance(a.q_norm, nn.RMSNorm) and a.q_norm.normalized_shape == (8,)
    assert isinstance(Attention(16, 2).q_norm, nn.Identity)
    x = torch.randn(1, 4, 16)
    out, w = a(x, return_weights=True)
    assert torch.allclose(a(x), out, atol=1e-5)
    # reference: RMS-normalise each head's q and k, then plain attention
    q, k, v = a.qkv(x).reshape(1, 4, 3, 2, 8).permute(2, 0, 3, 1, 4)
    rms = lambda z: z / z.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()  # noqa: E731
    want = a.proj(merge_heads(naive_attention(rms(q), rms(k), v)))
    assert torch.allclose(out, want, atol=1e-5)


def test_recorder_collects_every_layers_weights_and_detaches():
    model = DiT(DiTConfig(input_size=8, patch_size=2, dim=16, depth=2, num_heads=2, context_dim=6, pooled_dim=4))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.eval()
    args = (torch.randn(2, 1, 8, 8), torch.rand(2), torch.randn(2, 4), torch.randn(2, 3, 6))
    plain = model(*args)
    layers = [m for m in model.modules() if isinstance(m, AttentionModule)]
    assert len(layers) == 4  # self- and cross-attention in each of 2 blocks
    with AttentionRecorder(model) as rec:
        assert all(m.recorder is rec for m in layers)
        recorded = model(*args)
    assert torch.allclose(recorded, plain, atol=1e-5)  # the explicit path computes the same output
    assert [n for n, _ in rec.records] == ["blocks.0.attn", "blocks.0.cross_attn", "blocks.1.attn",
                                           "blocks.1.cross_attn"]
    assert rec.by_name("blocks.1.attn")[0].shape == (2, 2, 16, 16)
    assert rec.by_name("blocks.0.cross_attn")[0].shape == (2, 2, 16, 3)
    assert all(torch.allclose(w.sum(-1), torch.ones(())) for _, w in rec.records)
    assert all(m.recorder is None for m in layers)  # detached on exit
    model(*args)
    assert len(rec.records) == 4
    with AttentionRecorder(model, include=("cross_attn",)) as only:
        model(*args)
    assert [n for n, _ in only.records] == ["blocks.0.cross_attn", "blocks.1.cross_attn"]
    with pytest.raises(ValueError, match="no attention layers"):
        AttentionRecorder(model, include=("nothing",))
