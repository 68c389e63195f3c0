import pytest
import torch
from torch import nn

from minidit.blocks import DiTBlock, FinalLayer, modulate


def reference_dit_block(block, x, c):
    """DiT's block written out from the paper / facebookresearch/DiT models.py, using the block's weights."""
    mod = block.adaLN_modulation[1](torch.nn.functional.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
    ln = lambda z: torch.nn.functional.layer_norm(z, z.shape[-1:], eps=1e-6)  # noqa: E731
    h = ln(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    x = x + gate_msa[:, None] * block.attn(h)
    h = ln(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    mlp = block.mlp.fc2(torch.nn.functional.gelu(block.mlp.fc1(h), approximate="tanh"))
    return x + gate_mlp[:, None] * mlp


def randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)


@pytest.mark.parametrize("context_dim", [None, 24])
def test_fresh_block_is_exactly_the_identity(context_dim):
    blk = DiTBlock(16, 4, context_dim=context_dim)
    x, c = torch.randn(3, 10, 16), torch.randn(3, 16)
    ctx = torch.randn(3, 5, 24) if context_dim else None
    assert torch.equal(blk(x, c, ctx), x)


def test_block_matches_reference_equations():
    blk = DiTBlock(16, 4)
    randomise(blk)
    x, c = torch.randn(2, 7, 16), torch.randn(2, 16)
    assert torch.allclose(blk(x, c), reference_dit_block(blk, x, c), atol=1e-5)


def test_layernorms_are_not_affine_and_silu_is_on_the_conditioning_path():
    blk = DiTBlock(16, 4, context_dim=8)
    for ln in (blk.norm1, blk.norm2, blk.norm_cross):
        assert not ln.elementwise_affine and ln.eps == 1e-6
    assert isinstance(blk.adaLN_modulation[0], nn.SiLU)
    assert blk.adaLN_modulation[1].in_features == 16 and blk.adaLN_modulation[1].out_features == 6 * 16
    assert blk.mlp.act.approximate == "tanh"


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
    want = x + blk.attn(torch.nn.functional.layer_norm(x, (8,), eps=1e-6))
    assert torch.allclose(blk(x, c), want, atol=1e-6)
    # gate_mlp = 0 ⇒ MLP weights cannot change the output
    randomise(blk.mlp)
    assert torch.allclose(blk(x, c), want, atol=1e-6)
    with torch.no_grad():
        lin.bias.zero_()
        lin.bias[5 * 8 :] = 1.0  # gate_mlp only
    h = torch.nn.functional.layer_norm(x, (8,), eps=1e-6)
    assert torch.allclose(blk(x, c), x + blk.mlp(h), atol=1e-6)


def test_mlp_shift_scale_gate_receive_gradient():
    blk = DiTBlock(8, 2)
    randomise(blk)
    x, c = torch.randn(2, 5, 8), torch.randn(2, 8)
    blk(x, c).sum().backward()
    g = blk.adaLN_modulation[1].weight.grad  # rows: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
    for i in range(6):
        assert g[i * 8 : (i + 1) * 8].abs().sum() > 0, f"chunk {i} gets no gradient"


def test_samples_are_independent_and_token_counts_free():
    blk = DiTBlock(8, 2, context_dim=12)
    randomise(blk)
    for T in (1, 5, 9):
        x, c, ctx = torch.randn(3, T, 8), torch.randn(3, 8), torch.randn(3, 4, 12)
        out = blk(x, c, ctx)
        assert out.shape == (3, T, 8)
        x2 = x.clone()
        x2[1] += 1
        out2 = blk(x2, c, ctx)
        assert torch.allclose(out2[0], out[0]) and torch.allclose(out2[2], out[2])


def test_cross_attention_block_needs_context_and_ignores_padding():
    blk = DiTBlock(8, 2, context_dim=12)
    randomise(blk)
    x, c = torch.randn(2, 5, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="pass context"):
        blk(x, c)
    ctx = torch.randn(2, 4, 12)
    mask = torch.tensor([[True, True, False, False], [True] * 4])
    out = blk(x, c, ctx, mask)
    ctx[0, 2:] = 99.0
    assert torch.allclose(blk(x, c, ctx, mask), out, atol=1e-5)


def test_modulate_and_final_layer():
    x, shift, scale = torch.randn(2, 3, 4), torch.randn(2, 4), torch.randn(2, 4)
    assert torch.allclose(modulate(x, shift, scale), x * (1 + scale[:, None]) + shift[:, None])
    fl = FinalLayer(8, 2, 3)
    assert torch.equal(fl(torch.randn(2, 5, 8), torch.randn(2, 8)), torch.zeros(2, 5, 12))
