"""The conditioning ablation's variants (DiT Table 4) and the FLOPs counter."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from minidit.blocks import AdaLNBlock, CrossAttentionBlock, DiTBlock, InContextBlock, PlainFinalLayer
from minidit.cost import dit_flops, dit_flops_breakdown
from minidit.models import DiT, DiTConfig, get_config, load_model, save_model
from minidit.viz import AttentionRecorder

VARIANTS = ["adaln-zero", "adaln", "cross-attention", "in-context"]
# DiT Table 4 (XL/2): parameters and Gflops (multiply-adds) per forward pass
PAPER = {"in-context": (449e6, 119.4), "cross-attention": (598e6, 137.6), "adaln": (600e6, 118.4),
         "adaln-zero": (675e6, 118.6)}


def small(conditioning, **kw):
    return DiTConfig(input_size=8, in_channels=2, patch_size=2, dim=32, depth=2, num_heads=2,
                     conditioning=conditioning, **kw)


def randomise(module, std=0.2):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)


def test_default_is_adaln_zero_and_unchanged():
    assert DiTConfig().conditioning == "adaln-zero"
    model = DiT(get_config("mnist-tiny"))
    assert all(type(b) is DiTBlock for b in model.blocks)
    # hand count of mnist-tiny (D = 64, L = 2, p = 4, C = 1, 10 classes + null)
    D, L = 64, 2
    block = (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D) + (6 * D * D + 6 * D)
    want = (16 * D + D) + (256 * D + D + D * D + D) + 11 * D + L * block + (2 * D * D + 2 * D) + (D * 16 + 16)
    assert model.num_params() == want


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_counts_and_flops_match_dit_table_4(variant):
    cfg = get_config("DiT-XL/2", conditioning=variant)
    with torch.device("meta"):
        n = DiT(cfg).num_params()
    params, gflops = PAPER[variant]
    assert abs(n - params) / params < 0.005, f"{variant}: {n:,} parameters vs {params:,.0f}"
    assert dit_flops(cfg) / 2e9 == pytest.approx(gflops, abs=0.25)  # the paper counts multiply-adds


def test_adaln_zero_costs_more_parameters_but_not_more_compute_than_cross_attention():
    """The seed says adaLN is more *parameter*-efficient; DiT Table 4 says it saves compute, not parameters."""
    cfgs = {v: get_config("DiT-XL/2", conditioning=v) for v in VARIANTS}
    with torch.device("meta"):
        n = {v: DiT(c).num_params() for v, c in cfgs.items()}
    assert n["adaln-zero"] > n["cross-attention"]
    assert dit_flops(cfgs["adaln-zero"]) < dit_flops(cfgs["cross-attention"])


def test_flops_hand_count():
    # T = 16 tokens, D = 32, L = 2, MLP hidden 128, patch 2×2×2 = 8 values per token
    T, D, L = 16, 32, 2
    want = (2 * T * 8 * D  # patch embedding
            + 2 * T * L * 12 * D * D  # qkv, out-proj, MLP
            + 4 * L * T * T * D  # attention
            + 2 * (256 * D + D * D)  # timestep MLP
            + 2 * L * D * 6 * D  # adaLN-Zero, once per image
            + 2 * D * 2 * D  # final adaLN
            + 2 * T * D * 8)  # final linear
    assert dit_flops(small("adaln-zero")) == want
    b = dit_flops_breakdown(small("in-context"))
    assert b["attention"] == 4 * L * (T + 2) ** 2 * D and b["adaln"] == 0
    assert dit_flops_breakdown(small("adaln"))["adaln"] == 2 * L * D * 4 * D


@pytest.mark.parametrize("variant", VARIANTS)
def test_flops_match_torch_flop_counter(variant):
    """Every matrix product the model runs, counted by torch (explicit attention path so q·kᵀ and w·v are seen)."""
    model = DiT(small(variant)).eval()
    with AttentionRecorder(model), FlopCounterMode(display=False) as fc:
        model(torch.randn(1, 2, 8, 8), torch.rand(1), torch.tensor([1]))
    assert fc.get_total_flops() == dit_flops(small(variant))


def test_text_context_flops_need_a_length():
    cfg = small("adaln-zero", context_dim=24)
    with pytest.raises(ValueError, match="context_len"):
        dit_flops(cfg)
    model = DiT(cfg).eval()
    with AttentionRecorder(model), FlopCounterMode(display=False) as fc:
        model(torch.randn(1, 2, 8, 8), torch.rand(1), torch.tensor([1]), context=torch.randn(1, 5, 24))
    assert fc.get_total_flops() == dit_flops(cfg, context_len=5)


def test_fresh_adaln_zero_block_is_the_identity_but_adaln_is_not():
    x, c = torch.randn(3, 7, 16), torch.randn(3, 16)
    assert torch.equal(DiTBlock(16, 4)(x, c), x)
    blk = AdaLNBlock(16, 4)
    assert not torch.allclose(blk(x, c), x, atol=1e-3)
    assert blk.adaLN_modulation[1].out_features == 4 * 16  # shift, scale × 2: no gates
    assert blk.adaLN_modulation[1].weight.abs().sum() > 0  # not zero-initialised


def test_adaln_block_matches_its_equations():
    blk = AdaLNBlock(16, 4)
    randomise(blk)
    x, c = torch.randn(2, 5, 16), torch.randn(2, 16)
    shift1, scale1, shift2, scale2 = blk.adaLN_modulation[1](F.silu(c)).chunk(4, dim=1)

    def ln(z):
        return F.layer_norm(z, (16,), eps=1e-6)

    h = x + blk.attn(ln(x) * (1 + scale1[:, None]) + shift1[:, None])
    want = h + blk.mlp(ln(h) * (1 + scale2[:, None]) + shift2[:, None])
    assert torch.allclose(blk(x, c), want, atol=1e-5)


def test_in_context_and_cross_attention_blocks_match_their_equations():
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 2, 16)
    ic = InContextBlock(16, 4)
    randomise(ic)
    h = x + ic.attn(ic.norm1(x))
    assert torch.allclose(ic(x), h + ic.mlp(ic.norm2(h)), atol=1e-5)
    assert ic.norm1.elementwise_affine  # a plain ViT block: LayerNorm keeps its own affine
    ca = CrossAttentionBlock(16, 4)
    randomise(ca)
    h = x + ca.attn(ca.norm1(x))
    h = h + ca.cross_attn(ca.norm2(h), ctx)
    assert torch.allclose(ca(x, None, ctx), h + ca.mlp(ca.norm3(h)), atol=1e-5)
    with pytest.raises(ValueError, match="context"):
        ca(x)


def test_in_context_blocks_see_two_extra_tokens_and_the_output_drops_them():
    model = DiT(small("in-context"))
    seen = []
    model.blocks[0].register_forward_hook(lambda m, args, out: seen.append(out.shape))
    randomise(model.final_layer)
    out = model(torch.randn(3, 2, 8, 8), torch.rand(3), torch.tensor([0, 1, 2]))
    assert seen == [torch.Size([3, 16 + 2, 32])] and out.shape == (3, 2, 8, 8)
    assert isinstance(model.final_layer, PlainFinalLayer)


def test_cross_attention_attends_to_exactly_the_two_condition_tokens():
    model = DiT(small("cross-attention")).eval()
    with AttentionRecorder(model, include=("cross_attn",)) as rec:
        model(torch.randn(3, 2, 8, 8), torch.rand(3), torch.tensor([0, 1, 2]))
    assert len(rec.records) == 2 and all(w.shape == (3, 2, 16, 2) for _, w in rec.records)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_outputs_zero_at_init_and_depends_on_t_and_y(variant):
    model = DiT(small(variant)).eval()
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([0.3, 0.3]), torch.tensor([1, 1])
    assert torch.equal(model(x, t, y), torch.zeros_like(x))  # the zero-initialised final Linear
    randomise(model, std=0.1)
    out = model(x, t, y)
    assert not torch.allclose(model(x, t, torch.tensor([1, 4])), out)  # label changes the prediction
    assert not torch.allclose(model(x, torch.tensor([0.3, 0.9]), y), out)  # time changes the prediction
    x2 = x.clone()
    x2[1] += 1  # samples do not interact
    assert torch.allclose(model(x2, t, y)[0], out[0], atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_train_checkpoint_and_reload(variant, tmp_path):
    model = DiT(small(variant))
    randomise(model, std=0.05)
    x, t, y = torch.randn(2, 2, 8, 8), torch.rand(2), torch.tensor([1, 2])
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.grad_checkpointing = ckpt
        model(x, t, y, drop_mask=torch.zeros(2, dtype=torch.bool)).pow(2).sum().backward()  # no label dropout
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    save_model(tmp_path / "m.safetensors", model)
    again = load_model(tmp_path / "m.safetensors")
    assert again.config.conditioning == variant
    model.eval()
    assert torch.equal(again(x, t, y), model(x, t, y))


@pytest.mark.parametrize("kwargs", [dict(conditioning="film"), dict(conditioning="adaln", context_dim=8),
                                    dict(conditioning="in-context", qk_norm=True)])
def test_bad_conditioning(kwargs):
    with pytest.raises(ValueError, match="conditioning"):
        small(**{"conditioning": "adaln-zero", **kwargs})
