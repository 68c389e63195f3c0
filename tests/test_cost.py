"""The FLOPs model (variants.cost) against torch's FlopCounterMode: DiT, its attention variants, text DiT, MMDiT.

(The memory model and the measuring tools live in minidit.variants.speed: tests/test_speed.py.)
"""

from __future__ import annotations

import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minidit.attention import AttentionModule
from minidit.mmdit import MMDiT, MMDiTConfig
from minidit.models import DiT, DiTConfig, get_config
from minidit.variants.attention import VariantConfig, VariantDiT
from minidit.variants.cost import dit_cost_at, dit_flops, dit_flops_breakdown, mmdit_flops, train_flops_per_image


def explicit_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Route every attention through the explicit q·kᵀ / weights·v matmuls, which FlopCounterMode counts
    (it has no formula for the CPU flash-attention kernel): a recorder that keeps nothing."""
    for m in model.modules():
        if isinstance(m, AttentionModule):
            m.recorder = types.SimpleNamespace(add=lambda module, weights: None)
    return model


def counted_flops(fn, monkeypatch=None) -> int:
    """Matmul FLOPs of fn() by FlopCounterMode, plus 4·Tq·Tk·d per batch·head for every SDPA call (FlopCounterMode
    has no formula for the CPU flash kernel: the shapes of each actual call are counted instead). A float mask
    (ALiBi's bias) sends SDPA to its math kernel instead, whose matmuls FlopCounterMode counts itself."""
    sdpa_flops = []
    if monkeypatch is not None:
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def counting_sdpa(q, k, v, attn_mask=None, *args, **kwargs):
            if attn_mask is None or attn_mask.dtype == torch.bool:
                sdpa_flops.append(4 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1])
            return sdpa(q, k, v, attn_mask, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() + sum(sdpa_flops)


def build(cfg: DiTConfig) -> DiT:
    return (VariantDiT if isinstance(cfg, VariantConfig) else DiT)(cfg)


@pytest.mark.parametrize("cfg", [
    get_config("mnist-s4"),
    DiTConfig(input_size=16, in_channels=4, patch_size=2, dim=48, depth=2, num_heads=4, mlp_ratio=3.0),
    VariantConfig(patch_size=2, dim=32, depth=2, num_heads=4, n_kv_heads=2),
    VariantConfig(patch_size=2, dim=32, depth=2, num_heads=4, alibi="manhattan"),
    VariantConfig(patch_size=2, dim=32, depth=2, num_heads=4, rope=True, n_kv_heads=1),
    VariantConfig(patch_size=2, dim=32, depth=2, num_heads=4, window=7, global_tokens=4),
], ids=["mnist-s4", "latent-ratio3", "gqa", "alibi", "rope-mqa", "window-globals"])
def test_dit_flops_equal_counted_matmul_flops(cfg, monkeypatch):
    model = build(cfg).eval()
    B = 3
    x, t, y = torch.randn(B, cfg.in_channels, cfg.input_size, cfg.input_size), torch.rand(B), torch.tensor([0, 1, 2])
    with torch.no_grad():
        assert counted_flops(lambda: model(x, t, y), monkeypatch) == B * dit_flops(cfg)
        if not getattr(cfg, "window", None):  # (shown tiled attention is a dense masked matrix)
            explicit_attention(model)  # the explicit path's q·kᵀ and weights·v matmuls count the same
            assert counted_flops(lambda: model(x, t, y)) == B * dit_flops(cfg)


def test_windowed_attention_costs_its_window_not_the_image(monkeypatch):
    cfg = VariantConfig(patch_size=2, dim=32, depth=2, num_heads=4, window=7, global_tokens=4)
    full = DiTConfig(patch_size=2, dim=32, depth=2, num_heads=4)
    model = VariantDiT(cfg).eval()
    with torch.no_grad():
        got = counted_flops(lambda: model(torch.randn(1, 1, 28, 28), torch.rand(1), torch.tensor([3])), monkeypatch)
    assert got == dit_flops(cfg) < dit_flops(full)  # 49 + 4 keys per query instead of 196
    T, D, L = 196, 32, 2
    assert dit_flops_breakdown(cfg)["attention"] == 4 * L * T * (49 + 4) * D


def test_grouped_query_attention_saves_key_value_flops():
    D, T, L = 32, 196, 2
    mha, gqa = DiTConfig(patch_size=2, dim=D, depth=L, num_heads=4), VariantConfig(patch_size=2, dim=D, depth=L,
                                                                                    num_heads=4, n_kv_heads=1)
    saved = dit_flops_breakdown(mha)["block_linears"] - dit_flops_breakdown(gqa)["block_linears"]
    assert saved == 2 * T * L * 2 * (D - D // 4) * D  # k and v project to one head of D/4 instead of four


def test_text_context_flops_need_a_length():
    cfg = DiTConfig(input_size=8, in_channels=2, patch_size=2, dim=32, depth=2, num_heads=2, context_dim=24)
    with pytest.raises(ValueError, match="context_len"):
        dit_flops(cfg)
    model = explicit_attention(DiT(cfg).eval())
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.randn(1, 2, 8, 8), torch.rand(1), torch.tensor([1]), context=torch.randn(1, 5, 24))
    assert fc.get_total_flops() == dit_flops(cfg, context_len=5)


def test_pooled_text_dit_flops():
    """A text DiT embeds a pooled vector instead of a label: the MLP's matmuls are counted too."""
    cfg = DiTConfig(input_size=8, in_channels=2, patch_size=2, dim=32, depth=2, num_heads=2, context_dim=24,
                    pooled_dim=24)
    model = explicit_attention(DiT(cfg).eval())
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.randn(1, 2, 8, 8), torch.rand(1), torch.randn(1, 24), context=torch.randn(1, 5, 24))
    assert fc.get_total_flops() == dit_flops(cfg, context_len=5)
    assert dit_flops_breakdown(cfg, 5)["pooled_mlp"] == 2 * (24 * 32 + 32 * 32)


@pytest.mark.parametrize("image_size", [None, 36])
def test_mmdit_flops_equal_counted_matmul_flops(image_size):
    cfg = MMDiTConfig(input_size=28, in_channels=1, patch_size=4, dim=64, depth=3, num_heads=4, context_dim=32,
                      pooled_dim=24, pos_embed_max_size=9)
    model = explicit_attention(MMDiT(cfg).eval())
    B, L, side = 2, 5, image_size or 28
    with torch.no_grad():
        got = counted_flops(lambda: model(torch.randn(B, 1, side, side), torch.rand(B), torch.randn(B, 24),
                                          torch.randn(B, L, 32)))
    assert got == B * mmdit_flops(cfg, L, image_size)
    if image_size:
        assert mmdit_flops(cfg, L, image_size) > mmdit_flops(cfg, L)
    with pytest.raises(ValueError, match="context_len"):
        mmdit_flops(cfg, 0)


def test_training_is_three_forwards():
    cfg = get_config("mnist-tiny")
    model = explicit_attention(DiT(cfg).train())
    x, t, y = torch.randn(4, 1, 28, 28), torch.rand(4), torch.arange(4)
    total = counted_flops(lambda: model(x, t, y).square().mean().backward())
    assert total / (4 * dit_flops(cfg)) == pytest.approx(3.0, rel=0.02)
    assert train_flops_per_image(cfg) == 3 * dit_flops(cfg)
    mm = MMDiTConfig()
    assert train_flops_per_image(mm, 7) == 3 * mmdit_flops(mm, 7)


def test_dit_xl2_matches_the_paper():
    """DiT Table 4: XL/2 at 256² is 118.6 Gflops (multiply-adds)."""
    assert dit_flops(get_config("DiT-XL/2")) / 2 / 1e9 == pytest.approx(118.6, abs=0.1)
    with pytest.raises(TypeError, match="DiTConfig"):
        dit_flops(dict(dim=32))


def test_cost_at_resolution_latent_and_patch():
    xl = get_config("DiT-XL/2")
    latent = dit_cost_at(xl, 256, latent_factor=8, patch_size=2)
    assert set(latent) == {"image_size", "latent_factor", "patch_size", "tokens", "gflops", "attention_share"}
    assert latent["tokens"] == 256 and latent["gflops"] == pytest.approx(dit_flops(xl) / 1e9)
    pixels = dit_cost_at(xl, 256, latent_factor=1, patch_size=2)
    assert pixels["tokens"] == 128**2  # 64× the tokens of the latent model
    assert pixels["attention_share"] > 0.5 > latent["attention_share"]  # quadratic attention takes over
    big = dit_cost_at(xl, 1024, latent_factor=8, patch_size=2)
    assert big["tokens"] == 16 * latent["tokens"] and big["gflops"] > 16 * latent["gflops"]
    coarse = dit_cost_at(xl, 256, latent_factor=8, patch_size=4)  # DiT-XL/4: a quarter of the tokens
    assert coarse["tokens"] == 64 and coarse["gflops"] == pytest.approx(dit_flops(get_config("DiT-XL/4")) / 1e9)
    with pytest.raises(ValueError, match="divide"):
        dit_cost_at(xl, 250, latent_factor=8)
