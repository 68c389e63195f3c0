"""The DiT of minidit.models: its block (adaLN-Zero, optional cross-attention), final layer, configs, the model and
the input checks of its `__call__`."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minidit.mmdit import MMDiT, MMDiTConfig
from minidit.models import CONFIGS, DiT, DiTBlock, DiTConfig, FinalLayer, Mlp, get_config, modulate, xavier_init

PAPER_PARAMS = {"DiT-S/2": 33.0e6, "DiT-B/2": 130.5e6, "DiT-L/2": 458.1e6, "DiT-XL/2": 675.1e6}


def randomise(module, std=0.2):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


# ---- the block ---------------------------------------------------------------------------------------------
def reference_dit_block(block, x, c, context=None, mask=None):
    """DiT's block written out from the paper / facebookresearch/DiT models.py (plus PixArt-α's cross-attention
    between attention and MLP), using the block's weights."""
    mod = block.adaLN_modulation[1](F.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
    ln = lambda z: F.layer_norm(z, z.shape[-1:], eps=1e-6)  # noqa: E731
    h = ln(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    x = x + gate_msa[:, None] * block.attn(h)
    if context is not None:
        x = x + block.cross_attn(ln(x), context, mask)
    h = ln(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    mlp = block.mlp.fc2(F.gelu(block.mlp.fc1(h), approximate="tanh"))
    return x + gate_mlp[:, None] * mlp


@pytest.mark.parametrize("context_dim", [None, 24])
def test_fresh_block_is_exactly_the_identity(context_dim):
    blk = DiTBlock(16, 4, context_dim=context_dim)
    x, c = torch.randn(3, 10, 16), torch.randn(3, 16)
    ctx = torch.randn(3, 5, 24) if context_dim else None
    assert torch.equal(blk(x, c, ctx), x)


@pytest.mark.parametrize("context_dim", [None, 12])
def test_block_matches_reference_equations(context_dim):
    blk = randomise(DiTBlock(16, 4, context_dim=context_dim))
    x, c = torch.randn(2, 7, 16), torch.randn(2, 16)
    ctx = torch.randn(2, 3, 12) if context_dim else None
    mask = torch.tensor([[True, True, False], [True] * 3]) if context_dim else None
    assert torch.allclose(blk(x, c, ctx, mask), reference_dit_block(blk, x, c, ctx, mask), atol=1e-5)


def test_layernorms_are_not_affine_and_silu_is_on_the_conditioning_path():
    blk = DiTBlock(16, 4, context_dim=8)
    for ln in (blk.norm1, blk.norm2, blk.norm_cross):
        assert not ln.elementwise_affine and ln.eps == 1e-6
    assert isinstance(blk.adaLN_modulation[0], nn.SiLU)
    assert blk.adaLN_modulation[1].in_features == 16 and blk.adaLN_modulation[1].out_features == 6 * 16
    assert blk.mlp.act.approximate == "tanh" and blk.mlp.fc1.out_features == 64
    assert DiTBlock(16, 4).cross_attn is None


def test_block_init_is_xavier_with_zeroed_adaln_and_cross_attention_output():
    blk = DiTBlock(16, 4, context_dim=8)
    randomise(blk)
    blk.init_weights()
    for lin in (blk.adaLN_modulation[1], blk.cross_attn.proj):
        assert not lin.weight.any() and not lin.bias.any()
    w = blk.attn.qkv.weight  # xavier-uniform: bound √(6 / (fan_in + fan_out))
    bound = (6 / (16 + 48)) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound and (blk.attn.qkv.bias == 0).all()


def test_adaln_gets_gradient_at_init_and_the_block_then_learns():
    blk = DiTBlock(16, 4)
    x, c = torch.randn(4, 6, 16), torch.randn(4, 16)
    loss = (blk(x, c) - torch.randn_like(x)).pow(2).mean()
    loss.backward()
    assert blk.adaLN_modulation[1].weight.grad.abs().sum() > 0
    opt = torch.optim.SGD(blk.parameters(), lr=0.1)
    opt.step()
    assert not torch.allclose(blk(x, c), x)


def test_chunk_order_shift_scale_gate_for_attention_then_mlp():
    blk = DiTBlock(8, 2)
    randomise(blk.attn)
    randomise(blk.mlp)
    x, c = torch.randn(2, 5, 8), torch.zeros(2, 8)  # c = 0 ⇒ modulation = bias
    lin = blk.adaLN_modulation[1]
    with torch.no_grad():
        lin.bias.zero_()
        lin.bias[2 * 8 : 3 * 8] = 1.0  # gate_msa only
    want = x + blk.attn(F.layer_norm(x, (8,), eps=1e-6))
    assert torch.allclose(blk(x, c), want, atol=1e-6)
    # gate_mlp = 0 ⇒ MLP weights cannot change the output
    randomise(blk.mlp)
    assert torch.allclose(blk(x, c), want, atol=1e-6)
    with torch.no_grad():
        lin.bias.zero_()
        lin.bias[5 * 8 :] = 1.0  # gate_mlp only
    h = F.layer_norm(x, (8,), eps=1e-6)
    assert torch.allclose(blk(x, c), x + blk.mlp(h), atol=1e-6)


def test_mlp_shift_scale_gate_receive_gradient():
    blk = randomise(DiTBlock(8, 2))
    x, c = torch.randn(2, 5, 8), torch.randn(2, 8)
    blk(x, c).sum().backward()
    g = blk.adaLN_modulation[1].weight.grad  # rows: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
    for i in range(6):
        assert g[i * 8 : (i + 1) * 8].abs().sum() > 0, f"chunk {i} gets no gradient"


def test_samples_are_independent_and_token_counts_free():
    blk = randomise(DiTBlock(8, 2, context_dim=12))
    for T in (1, 5, 9):
        x, c, ctx = torch.randn(3, T, 8), torch.randn(3, 8), torch.randn(3, 4, 12)
        out = blk(x, c, ctx)
        assert out.shape == (3, T, 8)
        x2 = x.clone()
        x2[1] += 1
        out2 = blk(x2, c, ctx)
        assert torch.allclose(out2[0], out[0]) and torch.allclose(out2[2], out[2])


def test_cross_attention_block_ignores_padding():
    blk = randomise(DiTBlock(8, 2, context_dim=12))
    x, c = torch.randn(2, 5, 8), torch.randn(2, 8)
    ctx = torch.randn(2, 4, 12)
    mask = torch.tensor([[True, True, False, False], [True] * 4])
    out = blk(x, c, ctx, mask)
    ctx[0, 2:] = 99.0
    assert torch.allclose(blk(x, c, ctx, mask), out, atol=1e-5)
    ctx[1, 3] = 99.0
    assert not torch.allclose(blk(x, c, ctx, mask)[1], out[1], atol=1e-3)


def test_modulate_mlp_and_final_layer():
    x, shift, scale = torch.randn(2, 3, 4), torch.randn(2, 4), torch.randn(2, 4)
    assert torch.allclose(modulate(x, shift, scale), x * (1 + scale[:, None]) + shift[:, None])
    mlp = Mlp(4, 10)
    assert torch.allclose(mlp(x), mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh")))
    fl = FinalLayer(8, 2, 3)
    assert torch.equal(fl(torch.randn(2, 5, 8), torch.randn(2, 8)), torch.zeros(2, 5, 12))
    randomise(fl)
    x, c = torch.randn(2, 5, 8), torch.randn(2, 8)
    shift_, scale_ = fl.adaLN_modulation[1](F.silu(c)).chunk(2, dim=1)  # (shift, scale) as in DiT
    want = fl.linear(F.layer_norm(x, (8,), eps=1e-6) * (1 + scale_[:, None]) + shift_[:, None])
    assert torch.allclose(fl(x, c), want, atol=1e-5)


def test_xavier_init_touches_every_linear_and_zeroes_biases():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 2, bias=False)))
    randomise(m, 5.0)
    xavier_init(m)
    assert (m[0].bias == 0).all() and m[0].weight.abs().max() <= (6 / 12) ** 0.5
    assert m[2][0].weight.abs().max() <= (6 / 10) ** 0.5


# ---- the model -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,want", PAPER_PARAMS.items())
def test_dit_parameter_counts_match_the_paper(name, want):
    with torch.device("meta"):
        model = DiT(get_config(name))
    n = model.num_params()
    assert abs(n - want) / want < 0.01, f"{name}: {n:,} vs {want:,.0f}"
    cfg = model.config
    assert (cfg.input_size, cfg.in_channels, cfg.patch_size, cfg.num_classes) == (32, 4, 2, 1000)
    # no sigma channels: the output has the input's channels (the paper's counts include 2·C outputs: < 0.1 %)
    assert model.final_layer.linear.out_features == 2 * 2 * 4


def test_fresh_dit_outputs_exactly_zero():
    model = DiT(get_config("mnist-tiny"))
    out = model(torch.randn(4, 1, 28, 28), torch.rand(4), torch.tensor([0, 3, 9, 10]))
    assert out.shape == (4, 1, 28, 28) and torch.equal(out, torch.zeros_like(out))


def test_dit_init_follows_the_paper():
    model = randomise(DiT(get_config("mnist-tiny")))
    model.init_weights()
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.01
    assert abs(model.t_embedder.mlp[0].weight.std().item() - 0.02) < 0.005
    for block in model.blocks:
        assert (block.adaLN_modulation[1].weight == 0).all()
    assert (model.final_layer.linear.weight == 0).all() and (model.final_layer.adaLN_modulation[1].weight == 0).all()


def test_forward_reads_like_the_paper():
    """DiT.forward = patch tokens + positions → c = t_emb + y_emb → blocks(x, c) → final layer → unpatchify."""
    model = randomise(DiT(DiTConfig(input_size=8, patch_size=2, dim=16, depth=2, num_heads=2)), 0.1).eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([3, 10])
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder.embedding_table.weight[y]
    for block in model.blocks:
        h = reference_dit_block(block, h, c)
    tokens = model.final_layer(h, c)  # (B, 16, 4): a 4×4 grid of 2×2×1 patches
    want = tokens.reshape(2, 4, 4, 2, 2).permute(0, 1, 3, 2, 4).reshape(2, 1, 8, 8)
    assert torch.allclose(model(x, t, y), want, atol=1e-5)


@pytest.mark.parametrize("name", ["mnist-tiny", "mnist-s4", "mnist-s2", "mnist-p7"])
def test_course_configs_run(name):
    model = DiT(get_config(name, depth=1))
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.normal_()
    x = torch.randn(2, 1, 28, 28)
    out = model(x, torch.rand(2), torch.tensor([1, 2]))
    assert out.shape == x.shape and out.abs().sum() > 0


def test_latent_config_matches_the_shipped_vae_grid():
    cfg = get_config("mnist-latent-p2")
    assert (cfg.in_channels, cfg.input_size, cfg.num_tokens) == (4, 8, 16)
    out = DiT(cfg)(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 9]))
    assert out.shape == (2, 4, 8, 8)


def test_samples_do_not_interact():
    model = randomise(DiT(get_config("mnist-tiny")), 0.05).eval()
    x, t, y = torch.randn(3, 1, 28, 28), torch.rand(3), torch.tensor([1, 2, 3])
    out = model(x, t, y)
    x2 = x.clone()
    x2[0] = torch.randn(1, 28, 28)
    out2 = model(x2, t, y)
    assert torch.allclose(out[1:], out2[1:], atol=1e-6) and not torch.allclose(out[0], out2[0])


def test_labels_and_time_change_the_output():
    model = randomise(DiT(get_config("mnist-tiny")), 0.05).eval()
    x, t = torch.randn(2, 1, 28, 28), torch.rand(2)
    out = model(x, t, torch.tensor([1, 2]))
    assert not torch.allclose(out, model(x, t, torch.tensor([10, 10])), atol=1e-4)  # the null label
    assert not torch.allclose(out, model(x, 1 - t, torch.tensor([1, 2])), atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomise(DiT(get_config("mnist-tiny")), 0.05)
    x, t, y = torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([1, 2])
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.grad_checkpointing = ckpt
        model(x, t, y).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_text_dit_takes_a_pooled_vector_as_y_and_cross_attends_to_context():
    cfg = DiTConfig(input_size=8, patch_size=2, dim=16, depth=2, num_heads=2, context_dim=6, pooled_dim=5)
    model = randomise(DiT(cfg), 0.1).eval()
    assert isinstance(model.y_embedder.mlp[0], nn.Linear) and model.y_embedder.mlp[0].in_features == 5
    assert all(b.cross_attn is not None for b in model.blocks)
    x, t, pooled, ctx = torch.randn(2, 1, 8, 8), torch.rand(2), torch.randn(2, 5), torch.randn(2, 4, 6)
    mask = torch.tensor([[True, True, False, False], [True] * 4])
    out = model(x, t, pooled, ctx, mask)
    assert out.shape == x.shape
    h = model.x_embedder(x) + model.pos_embed  # reference: c = t_emb + MLP(pooled), blocks cross-attend
    c = model.t_embedder(t) + model.y_embedder(pooled)
    for block in model.blocks:
        h = reference_dit_block(block, h, c, ctx, mask)
    want = model.final_layer(h, c).reshape(2, 4, 4, 2, 2).permute(0, 1, 3, 2, 4).reshape(2, 1, 8, 8)
    assert torch.allclose(out, want, atol=1e-5)
    ctx2 = ctx.clone()
    ctx2[0, 2:] = 50.0  # padded tokens do not matter
    assert torch.allclose(model(x, t, pooled, ctx2, mask), out, atol=1e-5)


# ---- configs and input checks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(patch_size=3), "input_size/patch_size"),
    (dict(num_heads=5), "num_heads"),
    (dict(dim=30), "dim"),
    (dict(depth=0), "depth"),
    (dict(num_classes=0), "num_classes"),
    (dict(context_dim=0), "context_dim"),
    (dict(pooled_dim=-1), "pooled_dim"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=f"invalid DiTConfig.*{match}"):
        DiTConfig(**kwargs)


def test_config_names_and_removed_fields():
    with pytest.raises(ValueError, match="unknown config 'DiT-XXL/2'"):
        get_config("DiT-XXL/2")
    assert get_config("mnist-s4", depth=8).depth == 8 and CONFIGS["mnist-s4"].depth == 6
    for gone in ("learn_sigma", "attn", "conditioning", "class_dropout"):
        with pytest.raises(TypeError):
            DiTConfig(**{gone: None})
    assert DiTConfig().to_dict()["pooled_dim"] is None


X, T, Y = torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([1, 2])


@pytest.mark.parametrize("x,t,y,match", [
    (torch.randn(2, 3, 28, 28), T, Y, r"x must be float \(B, 1, 28, 28\), got torch.float32 \(2, 3, 28, 28\)"),
    (torch.randn(2, 1, 32, 32), T, Y, r"x must be .* got torch.float32 \(2, 1, 32, 32\)"),
    (torch.randint(0, 5, (2, 1, 28, 28)), T, Y, r"x must be float .* got torch.int64"),
    (torch.randn(1, 28, 28), T, Y, r"expected an image batch \(B, C, H, W\), got \(1, 28, 28\)"),
    (X, torch.rand(3), Y, r"t must be a tensor of shape \(2,\) in \[0, 1\], got torch.float32 \(3,\)"),
    (X, 0.5, Y, r"t must be a tensor .* got float"),
    (X, T, torch.tensor([1]), r"y must be integer class labels \(2,\), got torch.int64 \(1,\)"),
    (X, T, torch.tensor([1.0, 2.0]), r"y must be integer class labels \(2,\), got torch.float32"),
    (X, T, torch.tensor([1, 11]), r"labels must be in \[0, 10\] \(10 = null\), got \[1, 11\]"),
    (X, T, torch.tensor([-1, 2]), r"labels must be in \[0, 10\]"),
])
def test_bad_model_inputs(x, t, y, match):
    with pytest.raises(ValueError, match=match):
        DiT(get_config("mnist-tiny"))(x, t, y)


def test_bad_text_inputs_name_what_was_expected_and_what_came():
    model = DiT(DiTConfig(input_size=8, patch_size=2, dim=16, depth=1, num_heads=2, context_dim=6, pooled_dim=5))
    x, t, pooled, ctx = torch.randn(2, 1, 8, 8), torch.rand(2), torch.randn(2, 5), torch.randn(2, 3, 6)
    cases = [
        ((x, t, torch.tensor([1, 2]), ctx), r"y must be the pooled text vector \(2, 5\), got torch.int64 \(2,\)"),
        ((x, t, pooled), r"this model needs context tokens \(B, L, 6\)"),
        ((x, t, pooled, torch.randn(2, 3, 4)), r"context must be \(2, L, 6\), got torch.float32 \(2, 3, 4\)"),
        ((x, t, pooled, torch.randn(3, 6)), r"context must be \(2, L, 6\), got torch.float32 \(3, 6\)"),
        ((x, t, pooled, ctx, torch.ones(2, 3)), r"context_mask must be bool \(B, L\) like the context, got "
                                                r"torch.float32"),
        ((x, t, pooled, ctx, torch.ones(2, 4, dtype=torch.bool)), r"context_mask must be bool .* \(2, 4\)"),
        ((x, t, pooled, ctx, torch.tensor([[True, False, False], [False] * 3])), "at least one True"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            model(*args)
    with pytest.raises(ValueError, match="takes no context tokens"):
        DiT(get_config("mnist-tiny"))(X, T, Y, torch.randn(2, 3, 6))


def test_mmdit_call_checks_its_inputs_too():
    model = MMDiT(MMDiTConfig(input_size=8, in_channels=1, patch_size=2, dim=16, depth=2, num_heads=2,
                              context_dim=6, pooled_dim=5))
    x, t, pooled, ctx = torch.randn(2, 1, 8, 8), torch.rand(2), torch.randn(2, 5), torch.randn(2, 3, 6)
    assert model(x, t, pooled, ctx).shape == x.shape
    assert model(torch.randn(2, 1, 4, 6), t, pooled, ctx).shape == (2, 1, 4, 6)  # any size within the table
    for args, match in [
        ((torch.randn(2, 3, 8, 8), t, pooled, ctx), r"x must be float \(B, 1, 8, 8\), got torch.float32 \(2, 3, "),
        ((x, t, torch.randn(2, 4), ctx), r"y must be the pooled text vector \(2, 5\), got torch.float32 \(2, 4\)"),
        ((x, t, pooled, torch.randn(2, 3, 5)), r"context must be \(2, L, 6\)"),
        ((x, t[:1], pooled, ctx), r"t must be a tensor of shape \(2,\)"),
        ((torch.randn(2, 1, 10, 10), t, pooled, ctx), "larger than the position table allows"),
    ]:
        with pytest.raises(ValueError, match=match):
            model(*args)
