"""The conditioning ablation of DiT Table 4 (minidit.variants.conditioning): blocks, models, costs, training."""

from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from reference import saved_values
from torch.utils.flop_counter import FlopCounterMode

from minidit.attention import AttentionRecorder
from minidit.checkpoint import CheckpointError, load_checkpoint, load_model, save_model
from minidit.models import DiT, DiTBlock, DiTConfig, FinalLayer, get_config
from minidit.train import TrainConfig, Trainer
from minidit.variants import load_variant
from minidit.variants.conditioning import (
    CONDITIONINGS,
    AblationConfig,
    AblationDiT,
    AdaLNBlock,
    CrossAttentionBlock,
    GatedAdaLNBlock,
    InContextBlock,
    PlainFinalLayer,
)
from minidit.variants.cost import dit_flops, dit_flops_breakdown

VARIANTS = list(CONDITIONINGS)
# DiT Table 4 (XL/2): parameters and Gflops (multiply-adds) per forward pass; "adaln-gated" is not in the paper
PAPER = {"in-context": (449e6, 119.4), "cross-attention": (598e6, 137.6), "adaln": (600e6, 118.4),
         "adaln-zero": (675e6, 118.6)}


def small(conditioning, **kw) -> AblationConfig:
    return AblationConfig(input_size=8, in_channels=2, patch_size=2, dim=32, depth=2, num_heads=2,
                          conditioning=conditioning, **kw)


def ablation(name: str, conditioning: str) -> AblationConfig:
    """A named DiT config (minidit.models.CONFIGS) with another conditioning."""
    return AblationConfig(**asdict(get_config(name)), conditioning=conditioning)


def randomise(module, std=0.2):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def ln(z):
    return F.layer_norm(z, z.shape[-1:], eps=1e-6)


def test_variants_are_the_five_of_the_ablation():
    assert VARIANTS == ["adaln-zero", "adaln-gated", "adaln", "cross-attention", "in-context"]
    assert AblationConfig().conditioning == "adaln-zero" and issubclass(AblationConfig, DiTConfig)
    want = {"adaln-zero": DiTBlock, "adaln-gated": GatedAdaLNBlock, "adaln": AdaLNBlock,
            "cross-attention": CrossAttentionBlock, "in-context": InContextBlock}
    for v in VARIANTS:
        m = AblationDiT(small(v))
        assert all(type(b) is want[v] for b in m.blocks) and len(m.blocks) == 2
        final = PlainFinalLayer if v in ("cross-attention", "in-context") else FinalLayer
        assert type(m.final_layer) is final


def test_adaln_zero_is_exactly_dit():
    """Same parameters, same names, same outputs for the same weights: the ablation's baseline IS minidit's DiT."""
    cfg = small("adaln-zero")
    plain_cfg = DiTConfig(**{k: v for k, v in asdict(cfg).items() if k != "conditioning"})
    variant, plain = randomise(AblationDiT(cfg), 0.1).eval(), DiT(plain_cfg).eval()
    assert {k: v.shape for k, v in variant.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    plain.load_state_dict(variant.state_dict())
    x, t, y = torch.randn(3, 2, 8, 8), torch.rand(3), torch.tensor([0, 5, 10])
    assert torch.equal(variant(x, t, y), plain(x, t, y))
    fresh = [AblationDiT(cfg), DiT(plain_cfg)]  # the same initialisation from the same seed
    for m in fresh:
        torch.manual_seed(1)
        m.init_weights()
    assert all(torch.equal(a, b) for a, b in zip(fresh[0].state_dict().values(), fresh[1].state_dict().values()))


def test_hand_count_of_parameters():
    # mnist-tiny: D = 64, L = 2, p = 4, C = 1, 10 classes + null
    D, L = 64, 2
    block = (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D) + (6 * D * D + 6 * D)
    want = (16 * D + D) + (256 * D + D + D * D + D) + 11 * D + L * block + (2 * D * D + 2 * D) + (D * 16 + 16)
    assert AblationDiT(ablation("mnist-tiny", "adaln-zero")).num_params() == want
    assert AblationDiT(ablation("mnist-tiny", "adaln-gated")).num_params() == want  # same block, other init
    no_gates = want - L * 2 * (D * D + D)  # adaLN regresses 4·D instead of 6·D
    assert AblationDiT(ablation("mnist-tiny", "adaln")).num_params() == no_gates


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_counts_and_flops_match_dit_table_4(variant):
    cfg = ablation("DiT-XL/2", variant)
    with torch.device("meta"):
        n = AblationDiT(cfg).num_params()
    params, gflops = PAPER["adaln-zero" if variant == "adaln-gated" else variant]
    assert abs(n - params) / params < 0.005, f"{variant}: {n:,} parameters vs {params:,.0f}"
    assert dit_flops(cfg) / 2e9 == pytest.approx(gflops, abs=0.25)  # the paper counts multiply-adds


def test_adaln_zero_costs_more_parameters_but_not_more_compute_than_cross_attention():
    """The seed says adaLN is more *parameter*-efficient; DiT Table 4 says it saves compute, not parameters."""
    cfgs = {v: ablation("DiT-XL/2", v) for v in VARIANTS}
    with torch.device("meta"):
        n = {v: AblationDiT(c).num_params() for v, c in cfgs.items()}
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
    assert dit_flops(small("adaln-zero")) == dit_flops(small("adaln-gated")) == want
    b = dit_flops_breakdown(small("in-context"))
    assert b["attention"] == 4 * L * (T + 2) ** 2 * D and b["adaln"] == 0 and b["final_adaln"] == 0
    assert dit_flops_breakdown(small("adaln"))["adaln"] == 2 * L * D * 4 * D


@pytest.mark.parametrize("variant", VARIANTS)
def test_flops_match_torch_flop_counter(variant):
    """Every matrix product the model runs, counted by torch (explicit attention path so q·kᵀ and w·v are seen)."""
    model = AblationDiT(small(variant)).eval()
    with AttentionRecorder(model), FlopCounterMode(display=False) as fc:
        model(torch.randn(1, 2, 8, 8), torch.rand(1), torch.tensor([1]))
    assert fc.get_total_flops() == dit_flops(small(variant))


# ---- the blocks -----------------------------------------------------------------------------------------------
def test_fresh_adaln_zero_block_is_the_identity_but_the_ordinarily_initialised_ones_are_not():
    x, c = torch.randn(3, 7, 16), torch.randn(3, 16)
    assert torch.equal(DiTBlock(16, 4)(x, c), x)
    for blk, outputs in ((GatedAdaLNBlock(16, 4), 6), (AdaLNBlock(16, 4), 4)):
        assert not torch.allclose(blk(x, c), x, atol=1e-3)
        assert blk.adaLN_modulation[1].out_features == outputs * 16  # (shift, scale[, gate]) × 2
        assert blk.adaLN_modulation[1].weight.abs().sum() > 0  # not zero-initialised
    assert type(GatedAdaLNBlock(16, 4)).forward is DiTBlock.forward  # only the initialisation differs


def test_gated_adaln_block_matches_its_equations():
    blk = randomise(GatedAdaLNBlock(16, 4))
    x, c = torch.randn(2, 5, 16), torch.randn(2, 16)
    shift1, scale1, gate1, shift2, scale2, gate2 = blk.adaLN_modulation[1](F.silu(c)).chunk(6, dim=1)
    h = x + gate1[:, None] * blk.attn(ln(x) * (1 + scale1[:, None]) + shift1[:, None])
    want = h + gate2[:, None] * blk.mlp(ln(h) * (1 + scale2[:, None]) + shift2[:, None])
    assert torch.allclose(blk(x, c), want, atol=1e-5)


def test_adaln_block_matches_its_equations():
    blk = randomise(AdaLNBlock(16, 4))
    x, c = torch.randn(2, 5, 16), torch.randn(2, 16)
    shift1, scale1, shift2, scale2 = blk.adaLN_modulation[1](F.silu(c)).chunk(4, dim=1)
    h = x + blk.attn(ln(x) * (1 + scale1[:, None]) + shift1[:, None])
    want = h + blk.mlp(ln(h) * (1 + scale2[:, None]) + shift2[:, None])
    assert torch.allclose(blk(x, c), want, atol=1e-5)


def test_in_context_and_cross_attention_blocks_match_their_equations():
    x, cond = torch.randn(2, 5, 16), torch.randn(2, 2, 16)
    ic = randomise(InContextBlock(16, 4))

    def affine_ln(norm, z):  # a plain ViT block: the LayerNorms keep their own affine
        return ln(z) * norm.weight + norm.bias

    assert ic.norm1.elementwise_affine and ic.norm2.elementwise_affine
    h = x + ic.attn(affine_ln(ic.norm1, x))
    assert torch.allclose(ic(x), h + ic.mlp(affine_ln(ic.norm2, h)), atol=1e-5)
    ca = randomise(CrossAttentionBlock(16, 4))
    h = x + ca.attn(affine_ln(ca.norm1, x))
    h = h + ca.cross_attn(affine_ln(ca.norm_cross, h), cond)
    assert torch.allclose(ca(x, cond), h + ca.mlp(affine_ln(ca.norm2, h)), atol=1e-5)


def test_in_context_blocks_see_two_extra_tokens_and_the_output_drops_them():
    model = AblationDiT(small("in-context"))
    seen = []
    model.blocks[0].register_forward_hook(lambda m, args, out: seen.append(out.shape))
    randomise(model.final_layer)
    x, t, y = torch.randn(3, 2, 8, 8), torch.rand(3), torch.tensor([0, 1, 2])
    out = model(x, t, y)
    assert seen == [torch.Size([3, 16 + 2, 32])] and out.shape == (3, 2, 8, 8)
    first = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: first.append(args[0]))
    model(x, t, y)
    want = torch.stack([model.t_embedder(t), model.y_embedder(y)], dim=1)  # tokens 0, 1 = [t_emb, y_emb]
    assert torch.allclose(first[0][:, :2], want, atol=1e-6)


def test_cross_attention_attends_to_exactly_the_two_condition_tokens():
    model = AblationDiT(small("cross-attention")).eval()
    x, t, y = torch.randn(3, 2, 8, 8), torch.rand(3), torch.tensor([0, 1, 2])
    contexts = []
    model.blocks[1].cross_attn.register_forward_pre_hook(lambda m, args: contexts.append(args[1]))
    with AttentionRecorder(model, include=("cross_attn",)) as rec:
        model(x, t, y)
    assert len(rec.records) == 2 and all(w.shape == (3, 2, 16, 2) for _, w in rec.records)
    assert torch.allclose(contexts[0], torch.stack([model.t_embedder(t), model.y_embedder(y)], dim=1), atol=1e-6)


# ---- the models -----------------------------------------------------------------------------------------------
def tiny_data(n=32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 2, 8, 8, generator=g).clamp(-1, 1), torch.randint(0, 10, (n,), generator=g)


def trained(variant: str, steps: int = 8) -> Trainer:
    images, labels = tiny_data()
    cfg = TrainConfig(steps=steps, batch_size=16, lr=3e-3, ema_decay=0.5, label_dropout=0.1)
    return Trainer(AblationDiT(small(variant)), images, labels, cfg).run(progress=False)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_outputs_zero_at_init_and_learns_to_use_t_and_y(variant):
    model = AblationDiT(small(variant)).eval()
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([0.3, 0.3]), torch.tensor([1, 1])
    assert torch.equal(model(x, t, y), torch.zeros_like(x))  # the zero-initialised final Linear
    model = trained(variant).model.eval()
    with torch.no_grad():
        out = model(x, t, y)
        scale = out.abs().mean()
        assert scale > 0
        assert (model(x, t, torch.tensor([1, 4])) - out)[1].abs().mean() > 1e-3 * scale  # label changes it
        assert (model(x, torch.tensor([0.3, 0.9]), y) - out)[1].abs().mean() > 1e-3 * scale  # time changes it
        x2 = x.clone()
        x2[1] += 1  # samples do not interact
        assert torch.allclose(model(x2, t, y)[0], out[0], atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_checkpointing_gives_the_same_gradients_and_saves_less(variant):
    model = randomise(AblationDiT(small(variant)), 0.05).train()
    x, t, y = torch.randn(2, 2, 8, 8), torch.rand(2), torch.tensor([1, 2])
    grads, kept = [], []
    for ckpt in (False, True):
        model.zero_grad()
        model.grad_checkpointing = ckpt
        kept.append(saved_values(lambda: model(x, t, y).pow(2).sum().backward()))
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    assert kept[1] < kept[0]  # the blocks' activations are recomputed in backward


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_autocast_keeps_the_residual_stream_in_bf16(variant):
    model = AblationDiT(small(variant)).train()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 2, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    assert seen == [torch.bfloat16]  # the fp32 position table must not promote the tokens to fp32


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_train_save_and_reload(variant, tmp_path):
    trainer = trained(variant, steps=20)
    losses = [h["loss"] for h in trainer.history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    path = save_model(tmp_path / "m.safetensors", trainer.ema)
    _, meta = load_checkpoint(path)
    assert meta["model"] == "AblationDiT" and meta["config"]["conditioning"] == variant
    again = load_variant(path)
    assert type(again) is AblationDiT and again.config == trainer.ema.config and not again.training
    x, t, y = torch.randn(2, 2, 8, 8), torch.rand(2), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(again(x, t, y), trainer.ema(x, t, y))
    with pytest.raises(CheckpointError, match="AblationDiT"):
        load_model(path)  # the core package does not know the variants: load_variant does


def test_variants_check_their_inputs_like_dit():
    model = AblationDiT(small("in-context"))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\]"):
        model(torch.randn(1, 2, 8, 8), torch.rand(1), torch.tensor([11]))
    with pytest.raises(ValueError, match="takes no context"):
        model(torch.randn(1, 2, 8, 8), torch.rand(1), torch.tensor([1]), torch.randn(1, 3, 32))


@pytest.mark.parametrize("kwargs", [dict(conditioning="film"), dict(conditioning="adaln", context_dim=8),
                                    dict(conditioning="cross-attention", pooled_dim=8),
                                    dict(conditioning="in-context", qk_norm=True),
                                    dict(conditioning="adaln-gated", qk_norm=True)])
def test_bad_conditioning(kwargs):
    with pytest.raises(ValueError, match="conditioning"):
        small(**kwargs)
