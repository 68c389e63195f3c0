import math

import pytest
import torch

from minidit.mmdit import MMDiT, MMDiTConfig
from minidit.models import DiT, DiTConfig, get_config
from minidit.tokens import PatchEmbed, check_image, crop_pos_embed, patchify, sincos_1d, sincos_2d, unpatchify


@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize("C,H,W", [(1, 28, 28), (4, 32, 32), (3, 8, 16)])
def test_patchify_unpatchify_inverse(p, C, H, W):
    x = torch.randn(2, C, H, W)
    tok = patchify(x, p)
    assert tok.shape == (2, (H // p) * (W // p), p * p * C)
    assert torch.equal(unpatchify(tok, p, C, H // p, W // p), x)


def test_patch_order_is_row_major_and_features_pqc():
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)  # C=2, H=4, W=6
    tok = patchify(x, 2)  # 2×3 grid of patches
    assert tok.shape == (1, 6, 8)
    # token 1 = row 0, col 1: pixels rows 0-1, cols 2-3; features ordered (p, q, c)
    want = torch.stack([x[0, c, i, 2 + j] for i in range(2) for j in range(2) for c in range(2)])
    assert torch.equal(tok[0, 1], want)
    # token 3 = row 1, col 0
    assert tok[0, 3, 0] == x[0, 0, 2, 0]


@pytest.mark.parametrize("shape,p", [((1, 1, 28, 28), 3), ((1, 1, 28, 30), 4), ((1, 1, 9, 8), 2)])
def test_patchify_not_divisible(shape, p):
    with pytest.raises(ValueError, match="not divisible by patch size"):
        patchify(torch.zeros(shape), p)


def test_check_image_names_what_came():
    with pytest.raises(ValueError, match=r"expected an image batch \(B, C, H, W\), got \(1, 28, 28\)"):
        check_image(torch.zeros(1, 28, 28), 2)
    with pytest.raises(ValueError, match="got list"):
        check_image([1, 2], 2)
    with pytest.raises(ValueError, match="patch size 0"):
        check_image(torch.zeros(1, 1, 4, 4), 0)
    check_image(torch.zeros(1, 1, 4, 8), 4)  # non-square is fine


def test_unpatchify_errors():
    with pytest.raises(ValueError, match=r"do not form a 2×2 grid of 2×2×1 patches"):
        unpatchify(torch.zeros(1, 4, 5), 2, 1)  # 5 features are not 2·2·1
    with pytest.raises(ValueError, match="grid"):
        unpatchify(torch.zeros(1, 5, 4), 2, 1)  # 5 tokens are no square grid


def test_patch_embed_conv_equals_linear_on_patches_and_is_contiguous():
    pe = PatchEmbed(4, 3, 16)
    x = torch.randn(2, 3, 12, 8)
    lin = patchify(x, 4) @ pe.as_linear_weight().T + pe.proj.bias
    out = pe(x)
    assert out.shape == (2, 6, 16) and out.is_contiguous()
    assert torch.allclose(out, lin, atol=1e-5)


def test_patch_embed_init_is_xavier_on_the_linear_view():
    pe = PatchEmbed(4, 3, 16)
    pe.proj.bias.data.fill_(1.0)
    pe.init_weights()
    w = pe.as_linear_weight()  # (16, 48): fan_in 48, fan_out 16
    bound = math.sqrt(6 / (48 + 16))
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    assert torch.equal(pe.proj.bias, torch.zeros(16))


def test_sincos_1d_closed_form():
    pos = torch.tensor([0.0, 3.0, 7.5])
    e = sincos_1d(8, pos)
    assert e.shape == (3, 8)
    for m, p in enumerate(pos.tolist()):
        for k in range(4):
            om = 1.0 / 10000 ** (k / 4)
            assert math.isclose(e[m, k], math.sin(p * om), abs_tol=1e-12)
            assert math.isclose(e[m, 4 + k], math.cos(p * om), abs_tol=1e-12)


def test_sincos_2d_closed_form():
    D, h, w = 16, 3, 5
    table = sincos_2d(D, h, w)
    assert table.shape == (h * w, D) and table.dtype == torch.float32
    q = D // 4  # frequencies per (sin|cos) half of each axis
    for i in range(h):
        for j in range(w):
            row = table[i * w + j]
            for k in range(q):
                om = 1.0 / 10000 ** (k / q)
                assert math.isclose(row[k], math.sin(j * om), abs_tol=1e-6)  # column (x), sin
                assert math.isclose(row[q + k], math.cos(j * om), abs_tol=1e-6)  # column, cos
                assert math.isclose(row[2 * q + k], math.sin(i * om), abs_tol=1e-6)  # row (y), sin
                assert math.isclose(row[3 * q + k], math.cos(i * om), abs_tol=1e-6)


def test_sincos_matches_diffusers():
    emb = pytest.importorskip("diffusers.models.embeddings")
    ref = emb.get_2d_sincos_pos_embed(64, 7, base_size=7, output_type="pt")
    assert torch.allclose(sincos_2d(64, 7), ref.float(), atol=1e-6)
    ref_big = emb.get_2d_sincos_pos_embed(64, 12, base_size=4, output_type="pt")  # SD3-style scaled table
    assert torch.allclose(sincos_2d(64, 12, base_size=4), ref_big.float(), atol=1e-6)


def test_crop_is_the_centre_of_the_big_table():
    D, S = 32, 9
    big = sincos_2d(D, S)
    crop = crop_pos_embed(big, S, 3, 5)
    top, left = 3, 2
    want = torch.stack([big[(top + i) * S + left + j] for i in range(3) for j in range(5)])
    assert torch.equal(crop, want)
    assert torch.equal(crop_pos_embed(big, S, S, S), big)
    with pytest.raises(ValueError, match="does not fit"):
        crop_pos_embed(big, S, 10, 2)


def test_sincos_bad_dim():
    with pytest.raises(ValueError, match="dim % 4 == 0"):
        sincos_2d(30, 4)
    with pytest.raises(ValueError, match="at least 1×1"):
        sincos_2d(32, 0)


def test_dit_adds_the_fixed_position_table_to_the_patch_tokens():
    model = DiT(get_config("mnist-tiny"))
    assert "pos_embed" not in model.state_dict()  # fixed: rebuilt from the config, never saved
    assert torch.equal(model.pos_embed[0], sincos_2d(64, 7))
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    x = torch.randn(2, 1, 28, 28)
    model(x, torch.rand(2), torch.tensor([1, 2]))
    assert torch.allclose(seen[0], model.x_embedder(x) + sincos_2d(64, 7), atol=1e-6)


def test_residual_stream_keeps_the_patch_convs_dtype_under_autocast():
    """bf16 patch tokens + the fp32 position table stay bf16 (no fp32 residual stream): in a DiT, the
    text-conditioned DiT and an MMDiT the first block receives bf16 tokens under autocast, fp32 without."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = PatchEmbed(4, 1, 8)(torch.randn(2, 1, 8, 8))
    assert tokens.dtype == torch.bfloat16 and tokens.is_contiguous()

    x, t = torch.randn(2, 1, 28, 28), torch.rand(2)
    text, pooled = torch.randn(2, 3, 4), torch.randn(2, 4)
    calls = {
        "dit": (DiT(get_config("mnist-tiny")), (x, t, torch.tensor([1, 2]))),
        "text-dit": (DiT(DiTConfig(patch_size=4, dim=16, depth=2, num_heads=2, context_dim=4, pooled_dim=4)),
                     (x, t, pooled, text)),
        "mmdit": (MMDiT(MMDiTConfig(input_size=28, in_channels=1, patch_size=7, dim=16, depth=2, num_heads=2,
                                    context_dim=4, pooled_dim=4)), (x, t, pooled, text)),
    }
    for name, (model, args) in calls.items():
        seen: list[torch.dtype] = []
        model.blocks[0].register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0].dtype))
        for bf16 in (True, False):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model.eval()(*args)
        assert seen == [torch.bfloat16, torch.float32], name
