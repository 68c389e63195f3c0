import math

import pytest
import torch
from torch import nn

from minidit.blocks import DiTBlock
from minidit.mmdit import JointAttention, MMDiT, MMDiTBlock, MMDiTConfig, joint_attention
from minidit.models import load_model, save_model
from minidit.tokens import crop_pos_embed, sincos_2d
from minidit.viz import AttentionRecorder


def naive_joint(q_t, k_t, v_t, q_i, k_i, v_i, txt_mask=None):
    """The definition, one (batch, head, query) at a time, without concatenating tensors."""
    B, H, L, d = q_t.shape
    T = q_i.shape[2]
    keys = [(k_t, v_t, j, True) for j in range(L)] + [(k_i, v_i, j, False) for j in range(T)]
    out_t, out_i = torch.zeros_like(q_t), torch.zeros_like(q_i)
    for b in range(B):
        for h in range(H):
            for q_src, out, n in ((q_t, out_t, L), (q_i, out_i, T)):
                for r in range(n):
                    scores, values = [], []
                    for k_src, v_src, j, is_txt in keys:
                        if is_txt and txt_mask is not None and not txt_mask[b, j]:
                            continue
                        scores.append(float(q_src[b, h, r] @ k_src[b, h, j]) / math.sqrt(d))
                        values.append(v_src[b, h, j])
                    w = torch.softmax(torch.tensor(scores), 0)
                    out[b, h, r] = (w[:, None] * torch.stack(values)).sum(0)
    return out_t, out_i


def test_joint_attention_matches_definition_with_mask():
    q_t, k_t, v_t = (torch.randn(2, 2, 4, 8) for _ in range(3))
    q_i, k_i, v_i = (torch.randn(2, 2, 5, 8) for _ in range(3))
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    for m in (None, mask):
        o_t, o_i = joint_attention(q_t, k_t, v_t, q_i, k_i, v_i, m)
        r_t, r_i = naive_joint(q_t, k_t, v_t, q_i, k_i, v_i, m)
        assert torch.allclose(o_t, r_t, atol=1e-5) and torch.allclose(o_i, r_i, atol=1e-5)
        e_t, e_i, w = joint_attention(q_t, k_t, v_t, q_i, k_i, v_i, m, return_weights=True)
        assert torch.allclose(e_t, o_t, atol=1e-5) and torch.allclose(e_i, o_i, atol=1e-5)
        assert w.shape == (2, 2, 9, 9) and torch.allclose(w.sum(-1), torch.ones(2, 2, 9))
    _, _, w = joint_attention(q_t, k_t, v_t, q_i, k_i, v_i, mask, return_weights=True)
    assert (w[1, :, :, 2:4] == 0).all()  # padded text keys get no weight, from text AND image queries
    with pytest.raises(ValueError, match="txt_mask"):
        joint_attention(q_t, k_t, v_t, q_i, k_i, v_i, torch.ones(2, 5, dtype=torch.bool))


def test_information_flows_both_ways():
    attn = JointAttention(16, 2)
    img, txt = torch.randn(1, 6, 16), torch.randn(1, 3, 16)
    o_img, o_txt = attn(img, txt)
    img2 = img.clone()
    img2[0, 0] += 1.0
    assert not torch.allclose(attn(img2, txt)[1], o_txt, atol=1e-4)  # text reads the image
    txt2 = txt.clone()
    txt2[0, 0] += 1.0
    assert not torch.allclose(attn(img, txt2)[0], o_img, atol=1e-4)  # and the image reads the text


def test_mmdit_block_with_shared_weights_is_dit_on_the_concatenation():
    """A DiT block over [text; image] = an MMDiT block whose two weight sets are equal (SD3 §4)."""
    D, H = 16, 4
    dit = DiTBlock(D, H)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.2)
    mm = MMDiTBlock(D, H)
    with torch.no_grad():
        for s in ("img", "txt"):
            getattr(mm, f"adaLN_{s}")[1].load_state_dict(dit.adaLN_modulation[1].state_dict())
            getattr(mm.attn, f"qkv_{s}").load_state_dict(dit.attn.qkv.state_dict())
            getattr(mm.attn, f"proj_{s}").load_state_dict(dit.attn.proj.state_dict())
            getattr(mm, f"mlp_{s}").load_state_dict(dit.mlp.state_dict())
    img, txt, c = torch.randn(2, 7, D), torch.randn(2, 3, D), torch.randn(2, D)
    want = dit(torch.cat([txt, img], 1), c)
    o_img, o_txt = mm(img, txt, c)
    assert torch.allclose(torch.cat([o_txt, o_img], 1), want, atol=1e-5)


def test_fresh_block_is_identity_and_pre_only_drops_text_output():
    blk = MMDiTBlock(16, 2, qk_norm=True)
    img, txt, c = torch.randn(2, 5, 16), torch.randn(2, 3, 16), torch.randn(2, 16)
    o_img, o_txt = blk(img, txt, c)
    assert torch.equal(o_img, img) and torch.equal(o_txt, txt)
    last = MMDiTBlock(16, 2, pre_only=True)
    assert last.attn.proj_txt is None and not hasattr(last, "mlp_txt")
    assert last.adaLN_txt[1].out_features == 2 * 16  # (shift, scale) only
    with torch.no_grad():
        for p in last.parameters():
            p.normal_(0, 0.2)
    o_img, o_txt = last(img, txt, c)
    assert o_txt is None and o_img.shape == img.shape


def test_qk_norm_is_rmsnorm_per_head_and_per_modality():
    a = JointAttention(16, 2, qk_norm=True)
    norms = [a.q_norm_img, a.k_norm_img, a.q_norm_txt, a.k_norm_txt]
    assert all(isinstance(n, nn.RMSNorm) and n.normalized_shape == (8,) for n in norms)
    assert len({id(n) for n in norms}) == 4
    assert isinstance(JointAttention(16, 2).q_norm_img, nn.Identity)


def _tiny(**kw) -> MMDiT:
    cfg = MMDiTConfig(input_size=16, in_channels=3, patch_size=4, dim=32, depth=3, num_heads=2, context_dim=12,
                      pooled_dim=10, **kw)
    return MMDiT(cfg)


def _randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def test_fresh_mmdit_outputs_zero_and_blocks_are_configured():
    m = _tiny()
    out = m(torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 5, 12), torch.randn(2, 10))
    assert out.shape == (2, 3, 16, 16) and torch.equal(out, torch.zeros_like(out))
    assert [b.pre_only for b in m.blocks] == [False, False, True]


def test_padding_mask_equals_truncated_text():
    """Independent reference: padded text + mask gives what the unpadded (shorter) text gives."""
    m = _randomize(_tiny(qk_norm=True)).eval()
    x, t, pooled = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 10)
    ctx = torch.randn(2, 6, 12)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    out = m(x, t, ctx, pooled, mask)
    assert torch.allclose(out[1:], m(x[1:], t[1:], ctx[1:, :4], pooled[1:]), atol=1e-5)
    assert torch.allclose(out[:1], m(x[:1], t[:1], ctx[:1], pooled[:1]), atol=1e-5)
    ctx2 = ctx.clone()
    ctx2[1, 4:] = 100 * torch.randn(2, 12)
    assert torch.allclose(m(x, t, ctx2, pooled, mask), out, atol=1e-5)
    assert not torch.allclose(m(x, t, ctx2, pooled), out, atol=1e-3)  # without the mask the padding leaks


def test_positions_are_a_centre_crop_and_other_resolutions_run():
    m = _randomize(_tiny(pos_embed_max_size=8)).eval()
    assert torch.allclose(m.pos_table, sincos_2d(32, 8))
    assert torch.equal(m.pos_embed(4, 4), crop_pos_embed(m.pos_table, 8, 4, 4))
    assert torch.equal(m.pos_embed(4, 4), sincos_2d(32, 8).reshape(8, 8, 32)[2:6, 2:6].reshape(16, 32))
    ctx, pooled = torch.randn(1, 3, 12), torch.randn(1, 10)
    assert m(torch.randn(1, 3, 24, 32), torch.rand(1), ctx, pooled).shape == (1, 3, 24, 32)
    with pytest.raises(ValueError, match="at most 32 pixels"):
        m(torch.randn(1, 3, 36, 36), torch.rand(1), ctx, pooled)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        MMDiTConfig(input_size=32, patch_size=4, pos_embed_max_size=4)


def test_recorder_collects_joint_weights_and_matches_sdpa():
    m = _randomize(_tiny()).eval()
    x, t, ctx, pooled = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 5, 12), torch.randn(2, 10)
    mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3])
    fast = m(x, t, ctx, pooled, mask)
    with AttentionRecorder(m) as rec:
        slow = m(x, t, ctx, pooled, mask)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert [n for n, _ in rec.records] == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    for _, w in rec.records:
        assert w.shape == (2, 2, 5 + 16, 5 + 16) and (w[1, :, :, 2:5] == 0).all()
    assert all(mod.recorder is None for mod in rec.modules)  # detached after the block: training stays on SDPA


def test_gradient_checkpointing_gives_the_same_gradients():
    m = _randomize(_tiny()).train()
    x, t, ctx, pooled = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 5, 12), torch.randn(2, 10)
    m(x, t, ctx, pooled).square().sum().backward()
    g = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.grad_checkpointing = True
    m(x, t, ctx, pooled).square().sum().backward()
    assert all(torch.allclose(a, p.grad, atol=1e-5) for a, p in zip(g, m.parameters()))


def test_input_validation():
    m = _tiny()
    x, t, ctx, pooled = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 5, 12), torch.randn(2, 10)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 1, 16, 16), t, ctx, pooled)
    with pytest.raises(ValueError, match="t must be"):
        m(x, torch.rand(3), ctx, pooled)
    with pytest.raises(ValueError, match="context must be"):
        m(x, t, torch.randn(2, 5, 7), pooled)
    with pytest.raises(ValueError, match="pooled must be"):
        m(x, t, ctx, torch.randn(2, 3))
    with pytest.raises(ValueError, match="context_mask"):
        m(x, t, ctx, pooled, torch.ones(2, 5))
    with pytest.raises(ValueError, match="num_heads"):
        MMDiTConfig(dim=32, num_heads=5)


def test_save_and_load_model_round_trip(tmp_path):
    m = _randomize(_tiny(qk_norm=True)).eval()
    save_model(tmp_path / "mm.safetensors", m)
    loaded = load_model(tmp_path / "mm.safetensors")
    assert isinstance(loaded, MMDiT) and loaded.config == m.config
    x, t, ctx, pooled = torch.randn(1, 3, 16, 16), torch.rand(1), torch.randn(1, 4, 12), torch.randn(1, 10)
    assert torch.equal(loaded(x, t, ctx, pooled), m(x, t, ctx, pooled))
