"""Attention variants (minidit.variants.attention), each against an independent reference.

References are written from the definitions with Python loops and `math` (no package helper is reused):
grouped-query attention = multi-head attention whose key/value heads are copies within a group; 2D ALiBi = a score
bias −slope_h · distance; 2D RoPE = a block-diagonal rotation per position; tiled attention = a per-query loop
over the keys of its own tile plus averaged global tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

from minidit.attention import Attention
from minidit.checkpoint import load_checkpoint, save_model
from minidit.models import DiT, DiTConfig
from minidit.train import TrainConfig, Trainer
from minidit.variants import load_variant
from minidit.variants.attention import VariantAttention, VariantConfig, VariantDiT, apply_rope, rope_2d_angles


def randomized(m: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, std)
    return m


def project(attn: VariantAttention, x: torch.Tensor):
    """q (B, H, T, d), k and v (B, Hkv, T, d) straight from the fused weight, by slicing rows (the definition)."""
    D, H, Hkv, d = x.shape[-1], attn.num_heads, attn.n_kv_heads, attn.head_dim
    W, b = attn.qkv.weight, attn.qkv.bias
    q = x @ W[:D].T + b[:D]
    k = x @ W[D:D + Hkv * d].T + b[D:D + Hkv * d]
    v = x @ W[D + Hkv * d:].T + b[D + Hkv * d:]
    B, T = x.shape[:2]
    return (q.view(B, T, H, d).transpose(1, 2), k.view(B, T, Hkv, d).transpose(1, 2),
            v.view(B, T, Hkv, d).transpose(1, 2))


def loop_attention(q, k, v, allowed=None, bias=None):
    """out[b, h, i] = Σ_j softmax_j(q_i·k_j/√d + bias[h, i, j]) v_j over the keys j with allowed(i, j)."""
    B, H, T, d = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                js = [j for j in range(k.shape[2]) if allowed is None or allowed(i, j)]
                s = torch.stack([q[b, h, i] @ k[b, h, j] / math.sqrt(d) for j in js])
                if bias is not None:
                    s = s + torch.tensor([bias(h, i, j) for j in js])
                p = torch.softmax(s, dim=0)
                out[b, h, i] = sum(p[n] * v[b, h, j] for n, j in enumerate(js))
    return out


def finish(attn: VariantAttention, o: torch.Tensor) -> torch.Tensor:
    B, H, T, d = o.shape
    return o.transpose(1, 2).reshape(B, T, H * d) @ attn.proj.weight.T + attn.proj.bias


# ---- grouped-query attention ---------------------------------------------------------------------------------
def test_gqa_equals_multi_head_attention_with_shared_key_value_heads():
    D, H, Hkv = 32, 4, 2
    gqa = randomized(VariantAttention(D, H, (1, 7), n_kv_heads=Hkv))
    assert gqa.qkv.weight.shape == (D + 2 * Hkv * D // H, D)  # fewer key/value parameters
    mha = Attention(D, H)
    d = D // H
    with torch.no_grad():  # MHA whose k/v heads 2g and 2g+1 are copies of GQA's kv head g
        W, b = gqa.qkv.weight, gqa.qkv.bias
        k_w, v_w = W[D:D + Hkv * d].view(Hkv, d, D), W[D + Hkv * d:].view(Hkv, d, D)
        k_b, v_b = b[D:D + Hkv * d].view(Hkv, d), b[D + Hkv * d:].view(Hkv, d)
        rep = [h * Hkv // H for h in range(H)]
        mha.qkv.weight.copy_(torch.cat([W[:D], k_w[rep].reshape(D, D), v_w[rep].reshape(D, D)]))
        mha.qkv.bias.copy_(torch.cat([b[:D], k_b[rep].reshape(D), v_b[rep].reshape(D)]))
        mha.proj.load_state_dict(gqa.proj.state_dict())
    x = torch.randn(2, 7, D)
    want = mha(x)
    assert torch.allclose(gqa(x), want, atol=1e-5)
    out, w = gqa(x, return_weights=True)
    assert torch.allclose(out, want, atol=1e-5) and w.shape == (2, H, 7, 7)
    assert torch.allclose(w[:, 0], w[:, 0]) and not torch.allclose(w[:, 0], w[:, 1])  # queries stay per head


def test_gqa_with_one_group_per_head_is_plain_attention_and_one_kv_head_is_mqa():
    D, H = 24, 3
    x = torch.randn(2, 5, D)
    for full in (VariantAttention(D, H, (1, 5), n_kv_heads=H), VariantAttention(D, H, (1, 5))):
        plain = Attention(D, H)  # the teaching path's attention: same parameter names and shapes
        plain.load_state_dict(full.state_dict())
        assert torch.allclose(full(x), plain(x), atol=1e-6)
    mqa = randomized(VariantAttention(D, H, (1, 5), n_kv_heads=1))
    q, k, v = project(mqa, x)  # k, v (B, 1, T, d): one head shared by every query head
    ref = loop_attention(q, k.expand(-1, H, -1, -1), v.expand(-1, H, -1, -1))
    assert torch.allclose(mqa(x), finish(mqa, ref), atol=1e-5)


# ---- 2D ALiBi ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("distance", ["euclidean", "manhattan"])
def test_alibi_2d_matches_loop_reference(distance):
    D, H, h, w = 16, 4, 3, 4
    attn = randomized(VariantAttention(D, H, (h, w), alibi=distance))
    x = torch.randn(2, h * w, D)

    def bias(head, i, j):
        (ri, ci), (rj, cj) = divmod(i, w), divmod(j, w)
        dist = math.hypot(ri - rj, ci - cj) if distance == "euclidean" else abs(ri - rj) + abs(ci - cj)
        return -(2 ** (-8 * (head + 1) / H)) * dist

    q, k, v = project(attn, x)
    want = finish(attn, loop_attention(q, k, v, bias=bias))
    assert torch.allclose(attn(x), want, atol=1e-5)
    out, wts = attn(x, return_weights=True)
    assert torch.allclose(out, want, atol=1e-5) and torch.allclose(wts.sum(-1), torch.ones(2, H, h * w))
    plain = Attention(D, H)
    plain.load_state_dict(attn.state_dict())
    assert not torch.allclose(plain(x), want, atol=1e-3)  # the bias matters


def test_alibi_makes_attention_local_when_queries_and_keys_carry_no_content():
    """With q = k = 0 the weights are softmax(−slope·distance): they decay with distance, steeper for head 0."""
    attn = VariantAttention(8, 2, (5, 5), alibi="euclidean")
    with torch.no_grad():
        attn.qkv.weight.zero_()
        attn.qkv.bias.zero_()
    _, w = attn(torch.randn(1, 25, 8), return_weights=True)
    centre = w[0, :, 12].view(2, 5, 5)  # query at (2, 2)
    assert (centre[:, 2, 2] > centre[:, 2, 3]).all() and (centre[:, 2, 3] > centre[:, 2, 4]).all()
    assert centre[0, 2, 2] > centre[1, 2, 2]  # head 0 has the largest slope


# ---- 2D RoPE -------------------------------------------------------------------------------------------------
def rotation_matrix(d: int, row: int, col: int, theta: float = 100.0) -> torch.Tensor:
    """Block-diagonal 2×2 rotations: pairs 0…d/4−1 by row·f_i, pairs d/4…d/2−1 by col·f_i, f_i = θ^(−i/(d/4))."""
    R = torch.zeros(d, d, dtype=torch.float64)
    for pair in range(d // 2):
        i, pos = (pair, row) if pair < d // 4 else (pair - d // 4, col)
        a = pos * theta ** (-i / (d // 4))
        R[2 * pair:2 * pair + 2, 2 * pair:2 * pair + 2] = torch.tensor([[math.cos(a), -math.sin(a)],
                                                                      [math.sin(a), math.cos(a)]])
    return R


def test_rope_2d_rotation_matches_block_diagonal_matrices():
    d, h, w = 8, 3, 4
    cos, sin = rope_2d_angles(d, h, w)
    x = torch.randn(2, 1, h * w, d, dtype=torch.float64)
    got = apply_rope(x, cos.double(), sin.double())
    for i in range(h * w):
        R = rotation_matrix(d, *divmod(i, w))
        assert torch.allclose(got[:, 0, i], x[:, 0, i] @ R.T, atol=1e-6)


def test_rope_2d_scores_depend_only_on_the_2d_offset():
    d = 16
    cos, sin = rope_2d_angles(d, 6, 6)
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)

    def score(pq, pk):
        iq, ik = pq[0] * 6 + pq[1], pk[0] * 6 + pk[1]
        rq = apply_rope(q.view(1, 1, 1, d), cos[iq:iq + 1].double(), sin[iq:iq + 1].double())
        rk = apply_rope(k.view(1, 1, 1, d), cos[ik:ik + 1].double(), sin[ik:ik + 1].double())
        return float((rq * rk).sum())

    assert score((1, 2), (3, 0)) == pytest.approx(score((2, 4), (4, 2)), abs=1e-5)  # same offset (2, −2)
    assert score((1, 2), (3, 0)) != pytest.approx(score((1, 2), (0, 3)), abs=1e-3)  # another offset
    assert score((0, 0), (0, 0)) == pytest.approx(float(q @ k), abs=1e-6)  # position 0 is the identity


def test_attention_with_rope_matches_rotated_loop_reference():
    D, H, h, w = 32, 2, 3, 3
    attn = randomized(VariantAttention(D, H, (h, w), rope=True, qk_norm=True))
    x = torch.randn(2, h * w, D)
    q, k, v = project(attn, x)
    q, k = attn.q_norm(q), attn.k_norm(k)  # rotation after QK-norm (as FLUX / SD3.5 with RoPE do)
    Rs = torch.stack([rotation_matrix(D // H, *divmod(i, w)) for i in range(h * w)]).float()  # (T, d, d)
    q, k = torch.einsum("tij,bhtj->bhti", Rs, q), torch.einsum("tij,bhtj->bhti", Rs, k)
    want = finish(attn, loop_attention(q, k, v))
    assert torch.allclose(attn(x), want, atol=1e-5)


# ---- tiled attention with global tokens ------------------------------------------------------------------------
def tile_reference(attn: VariantAttention, x: torch.Tensor, h: int, w: int, win: int, n_global: int) -> torch.Tensor:
    q, k, v = project(attn, x)
    g = math.isqrt(n_global)
    if g:  # global token (a, b) = mean of the keys/values in region a, b of a g×g partition
        regions = [[i for i in range(h * w) if (i // w) // (h // g) == a and (i % w) // (w // g) == b]
                   for a in range(g) for b in range(g)]
        k = torch.cat([k, torch.stack([k[:, :, r].mean(2) for r in regions], dim=2)], dim=2)
        v = torch.cat([v, torch.stack([v[:, :, r].mean(2) for r in regions], dim=2)], dim=2)

    def allowed(i, j):
        if j >= h * w:
            return True  # a global token
        return (i // w) // win == (j // w) // win and (i % w) // win == (j % w) // win

    return finish(attn, loop_attention(q, k, v, allowed))


@pytest.mark.parametrize("win, g", [(2, 0), (2, 1), (2, 4), (3, 0)])
def test_windowed_attention_matches_loop_reference(win, g):
    D, H, h, w = 16, 2, 6, 6
    attn = randomized(VariantAttention(D, H, (h, w), window=win, global_tokens=g))
    x = torch.randn(2, h * w, D)
    want = tile_reference(attn, x, h, w, win, g)
    assert torch.allclose(attn(x), want, atol=1e-5)  # block-sparse path
    out, wts = attn(x, return_weights=True)  # dense-mask path
    assert torch.allclose(out, want, atol=1e-5) and wts.shape == (2, H, h * w, h * w + g)
    assert (wts[:, :, 0, 2:h * w] == 0).sum() > 0 and torch.allclose(wts.sum(-1), torch.ones(2, H, h * w))


def test_window_without_globals_cuts_information_between_tiles_and_globals_restore_it():
    D, H, h = 16, 2, 4
    x = torch.randn(1, h * h, D)
    x2 = x.clone()
    x2[0, 0] += 3.0  # change one token of the top-left tile
    far = h * h - 1  # a token of the bottom-right tile
    local = randomized(VariantAttention(D, H, (h, h), window=2))
    assert torch.allclose(local(x)[0, far], local(x2)[0, far], atol=1e-6)
    glob = randomized(VariantAttention(D, H, (h, h), window=2, global_tokens=1))
    assert not torch.allclose(glob(x)[0, far], glob(x2)[0, far], atol=1e-4)


def test_window_covering_the_whole_grid_is_plain_attention():
    D, H, h = 16, 2, 4
    tiled, plain = VariantAttention(D, H, (h, h), window=h), Attention(D, H)
    plain.load_state_dict(tiled.state_dict())
    x = torch.randn(2, h * h, D)
    assert torch.allclose(tiled(x), plain(x), atol=1e-6)


# ---- the variants in a DiT, dtype, validation ------------------------------------------------------------------
VARIANTS = [dict(n_kv_heads=2), dict(alibi="euclidean"), dict(rope=True), dict(window=7, global_tokens=4),
            dict(rope=True, window=7, n_kv_heads=1)]


@pytest.mark.parametrize("attn", VARIANTS)
def test_variant_dit_trains_saves_and_reloads(attn, tmp_path):
    cfg = VariantConfig(patch_size=2, dim=32, depth=2, num_heads=4, **attn)
    model = randomized(VariantDiT(cfg), 0.05)
    assert all(type(b.attn) is VariantAttention and b.attn.grid == (14, 14) for b in model.blocks)
    relative = attn.get("rope") or attn.get("alibi")
    assert bool(model.pos_embed.abs().sum() == 0) == bool(relative)  # relative positions replace sin-cos
    x, t, y = torch.randn(3, 1, 28, 28), torch.rand(3), torch.tensor([0, 4, 10])
    out = model(x, t, y)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.blocks.parameters())
    images, labels = torch.randn(8, 1, 28, 28).clamp(-1, 1), torch.arange(8)
    trainer = Trainer(model, images, labels, TrainConfig(steps=2, batch_size=4, ema_decay=0.5)).run(progress=False)
    assert all(math.isfinite(h["loss"]) for h in trainer.history)
    path = save_model(tmp_path / "m.safetensors", trainer.ema)
    _, meta = load_checkpoint(path)
    assert meta["model"] == "VariantDiT" and {k: meta["config"][k] for k in attn} == attn
    again = load_variant(path)
    assert type(again) is VariantDiT and again.config == cfg
    with torch.no_grad():
        assert torch.equal(again(x, t, y), trainer.ema(x, t, y))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert again(x, t, y).dtype == torch.bfloat16


def test_default_variant_config_is_dit():
    """All options off: VariantDiT has DiT's parameters (same names and shapes) and computes DiT's function."""
    cfg = VariantConfig(patch_size=4, dim=32, depth=1, num_heads=4)
    assert (cfg.n_kv_heads, cfg.rope, cfg.alibi, cfg.window, cfg.global_tokens) == (None, False, None, None, 0)
    variant = randomized(VariantDiT(cfg), 0.1).eval()
    plain = DiT(DiTConfig(patch_size=4, dim=32, depth=1, num_heads=4)).eval()
    assert {k: v.shape for k, v in variant.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert variant.state_dict()["blocks.0.attn.qkv.weight"].shape == (96, 32)
    plain.load_state_dict(variant.state_dict())
    x, t, y = torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([3, 10])
    assert torch.allclose(variant(x, t, y), plain(x, t, y), atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(n_kv_heads=0), "n_kv_heads"),
    (dict(alibi="cosine"), "alibi"),
    (dict(window=3), "window"),
    (dict(window=2, global_tokens=3), "global_tokens"),
    (dict(window=2, global_tokens=9), "global_tokens"),  # 3 does not divide the 4×4 grid
    (dict(global_tokens=4), "global_tokens"),  # global tokens only with windows
    (dict(window=2, alibi="euclidean"), "window"),  # tiles and ALiBi cannot be combined
])
def test_invalid_attention_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VariantAttention(16, 4, (4, 4), **kwargs)


def test_invalid_variant_configs_raise():
    with pytest.raises(ValueError, match="rope"):
        VariantAttention(24, 4, (4, 4), rope=True)  # head_dim 6: 2D RoPE needs head_dim % 4 == 0
    with pytest.raises(ValueError, match="window"):
        VariantConfig(patch_size=4, window=2)  # a 7×7 grid
    with pytest.raises(ValueError, match="n_kv_heads"):
        VariantConfig(num_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="num_heads"):
        VariantConfig(dim=32, num_heads=5)  # DiTConfig's own checks still apply
