import math

import pytest
import torch
from reference import saved_values
from torch import nn

from minidit.attention import AttentionRecorder
from minidit.checkpoint import load_model, save_model
from minidit.embed import MlpEmbedder
from minidit.mmdit import JointAttention, MMDiT, MMDiTBlock, MMDiTConfig, joint_attention
from minidit.models import DiTBlock, DiTConfig
from minidit.tokens import crop_pos_embed, sincos_2d


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


def test_joint_attention_module_is_the_joint_attention_of_its_projections():
    """JointAttention = per-modality qkv (+ QK-norm) → joint_attention → per-modality output projections."""
    a = JointAttention(16, 2, qk_norm=True)
    with torch.no_grad():
        for n in (a.q_norm, a.k_norm, a.q_norm_txt, a.k_norm_txt):
            n.weight.uniform_(0.5, 1.5)
    img, txt = torch.randn(2, 6, 16), torch.randn(2, 3, 16)
    mask = torch.tensor([[True] * 3, [True, False, False]])

    def heads(z):  # (B, T, 3·D) → three (B, H, T, d)
        return z.reshape(z.shape[0], z.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)

    q_i, k_i, v_i = heads(a.qkv_img(img))
    q_t, k_t, v_t = heads(a.qkv_txt(txt))
    o_t, o_i = joint_attention(a.q_norm_txt(q_t), a.k_norm_txt(k_t), v_t, a.q_norm(q_i), a.k_norm(k_i), v_i, mask)
    want_img = a.proj_img(o_i.transpose(1, 2).reshape(2, 6, 16))
    want_txt = a.proj_txt(o_t.transpose(1, 2).reshape(2, 3, 16))
    got_img, got_txt = a(img, txt, mask)
    assert torch.allclose(got_img, want_img, atol=1e-5) and torch.allclose(got_txt, want_txt, atol=1e-5)
    got_img2, got_txt2, w = a(img, txt, mask, return_weights=True)  # the explicit path gives the same
    assert torch.allclose(got_img2, want_img, atol=1e-5) and w.shape == (2, 2, 9, 9)


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
    norms = [a.q_norm, a.k_norm, a.q_norm_txt, a.k_norm_txt]  # image stream: the base class's q_norm / k_norm
    assert all(isinstance(n, nn.RMSNorm) and n.normalized_shape == (8,) for n in norms)
    assert len({id(n) for n in norms}) == 4
    plain = JointAttention(16, 2)
    assert all(isinstance(n, nn.Identity) for n in (plain.q_norm, plain.k_norm, plain.q_norm_txt, plain.k_norm_txt))
    # each norm acts on its own stream: scaling the text query norm's gain changes only text → image scores
    img, txt = torch.randn(1, 4, 16), torch.randn(1, 3, 16)
    base = a(img, txt, return_weights=True)[2]
    with torch.no_grad():
        a.q_norm_txt.weight.mul_(3.0)
    w = a(img, txt, return_weights=True)[2]
    assert torch.allclose(w[:, :, 3:], base[:, :, 3:], atol=1e-6)  # image query rows unchanged
    assert not torch.allclose(w[:, :, :3], base[:, :, :3], atol=1e-3)  # text query rows changed


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
    out = m(torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 10), torch.randn(2, 5, 12))
    assert out.shape == (2, 3, 16, 16) and torch.equal(out, torch.zeros_like(out))
    assert [b.pre_only for b in m.blocks] == [False, False, True]
    assert isinstance(m.y_embedder, MlpEmbedder) and m.y_embedder.mlp[0].in_features == 10  # the pooled text
    assert issubclass(MMDiTConfig, DiTConfig) and m.config.num_tokens == 16


def test_conditioning_vector_is_time_plus_pooled_text():
    """c = t_emb + MLP(pooled), as in SD3: every block's adaLN and the final layer receive it."""
    m = _randomize(_tiny()).eval()
    x, t, ctx, pooled = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 5, 12), torch.randn(2, 10)
    seen = []
    m.final_layer.register_forward_hook(lambda mod, args, out: seen.append(args[1]))
    m(x, t, pooled, ctx)
    assert torch.allclose(seen[0], m.t_embedder(t) + m.y_embedder(pooled), atol=1e-6)


def test_padding_mask_equals_truncated_text():
    """Independent reference: padded text + mask gives what the unpadded (shorter) text gives."""
    m = _randomize(_tiny(qk_norm=True)).eval()
    x, t, pooled = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 10)
    ctx = torch.randn(2, 6, 12)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    out = m(x, t, pooled, ctx, mask)
    assert torch.allclose(out[1:], m(x[1:], t[1:], pooled[1:], ctx[1:, :4]), atol=1e-5)
    assert torch.allclose(out[:1], m(x[:1], t[:1], pooled[:1], ctx[:1]), atol=1e-5)
    ctx2 = ctx.clone()
    ctx2[1, 4:] = 100 * torch.randn(2, 12)
    assert torch.allclose(m(x, t, pooled, ctx2, mask), out, atol=1e-5)
    assert not torch.allclose(m(x, t, pooled, ctx2), out, atol=1e-3)  # without the mask the padding leaks


def _first_block_tokens(m: MMDiT, *args) -> torch.Tensor:
    """The image tokens (B, T, D) that enter the first block: patch embedding + positions."""
    seen = []
    hook = m.blocks[0].register_forward_pre_hook(lambda mod, a: seen.append(a[0]))
    m(*args)
    hook.remove()
    return seen[0]


def test_positions_are_a_centre_crop_and_other_resolutions_run():
    m = _randomize(_tiny(pos_embed_max_size=8)).eval()
    table = sincos_2d(32, 8)  # (8·8, D): one table for every grid up to 8×8 tokens
    assert torch.allclose(m.pos_table, table)
    ctx, pooled = torch.randn(1, 3, 12), torch.randn(1, 10)
    for h, w, top, left in [(4, 4, 2, 2), (6, 8, 1, 0)]:  # 16×16 and 24×32 pixels, patch 4
        x = torch.randn(1, 3, 4 * h, 4 * w)
        crop = table.reshape(8, 8, 32)[top:top + h, left:left + w].reshape(h * w, 32)  # the centre crop
        assert torch.equal(crop_pos_embed(table, 8, h, w), crop)
        assert torch.allclose(_first_block_tokens(m, x, torch.rand(1), pooled, ctx), m.x_embedder(x) + crop)
        assert m(x, torch.rand(1), pooled, ctx).shape == x.shape
    with pytest.raises(ValueError, match=r"larger than the position table allows \(32 pixels"):
        m(torch.randn(1, 3, 36, 36), torch.rand(1), pooled, ctx)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        MMDiTConfig(input_size=32, patch_size=4, pos_embed_max_size=4)


def test_bf16_autocast_keeps_the_residual_stream_in_bf16():
    """The fp32 position table follows the tokens' dtype: it must not promote the residual stream to fp32."""
    m = _randomize(_tiny()).train()
    x, t, ctx, pooled = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 5, 12), torch.randn(2, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _first_block_tokens(m, x, t, pooled, ctx).dtype == torch.bfloat16


def test_recorder_collects_joint_weights_and_matches_sdpa():
    m = _randomize(_tiny()).eval()
    x, t, ctx, pooled = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 5, 12), torch.randn(2, 10)
    mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3])
    fast = m(x, t, pooled, ctx, mask)
    with AttentionRecorder(m) as rec:
        slow = m(x, t, pooled, ctx, mask)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert [n for n, _ in rec.records] == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    for _, w in rec.records:
        assert w.shape == (2, 2, 5 + 16, 5 + 16) and (w[1, :, :, 2:5] == 0).all()
        assert torch.allclose(w.sum(-1), torch.ones(2, 2, 21))
    assert all(mod.recorder is None for mod in rec.modules)  # detached after the block: training stays on SDPA



def test_gradient_checkpointing_gives_the_same_gradients_and_saves_less():
    m = _randomize(_tiny()).train()
    x, t, ctx, pooled = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 5, 12), torch.randn(2, 10)
    kept = saved_values(lambda: m(x, t, pooled, ctx).square().sum().backward())
    g = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.grad_checkpointing = True
    kept_ckpt = saved_values(lambda: m(x, t, pooled, ctx).square().sum().backward())
    assert all(torch.allclose(a, p.grad, atol=1e-5) for a, p in zip(g, m.parameters()))
    assert kept_ckpt < kept  # the blocks' activations are recomputed in backward, not kept


def test_input_validation():
    m = _tiny()
    x, t, ctx, pooled = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 5, 12), torch.randn(2, 10)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 1, 16, 16), t, pooled, ctx)
    with pytest.raises(ValueError, match="image batch"):
        m(torch.randn(3, 16, 16), t, pooled, ctx)
    with pytest.raises(ValueError, match="not divisible by patch size"):
        m(torch.randn(2, 3, 18, 16), t, pooled, ctx)
    with pytest.raises(ValueError, match="t must be"):
        m(x, torch.rand(3), pooled, ctx)
    with pytest.raises(ValueError, match="context must be"):
        m(x, t, pooled, torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="needs context tokens"):
        m(x, t, pooled, None)
    with pytest.raises(ValueError, match="pooled text vector"):
        m(x, t, torch.randn(2, 3), ctx)
    with pytest.raises(ValueError, match="context_mask"):
        m(x, t, pooled, ctx, torch.ones(2, 5))
    with pytest.raises(ValueError, match="num_heads"):
        MMDiTConfig(dim=32, num_heads=5)
    with pytest.raises(ValueError, match="context_dim"):
        MMDiTConfig(context_dim=None)


def test_save_and_load_model_round_trip(tmp_path):
    m = _randomize(_tiny(qk_norm=True)).eval()
    save_model(tmp_path / "mm.safetensors", m)
    loaded = load_model(tmp_path / "mm.safetensors")
    assert isinstance(loaded, MMDiT) and loaded.config == m.config
    x, t, ctx, pooled = torch.randn(1, 3, 16, 16), torch.rand(1), torch.randn(1, 4, 12), torch.randn(1, 10)
    assert torch.equal(loaded(x, t, pooled, ctx), m(x, t, pooled, ctx))
