"""Parity with diffusers: the same weights in minidit and in diffusers give the same outputs (within 1e-5).

Reference classes (instantiated from small configs, nothing downloaded): `JointTransformerBlock` and
`SD3Transformer2DModel` for `minidit.mmdit`, `DiTTransformer2DModel` for `minidit.models.DiT`, and
`BasicTransformerBlock(cross_attention_dim=…, norm_type="ada_norm_zero")` for DiTBlock's cross-attention path.

Conventions that differ and how the tests map them:
- time: minidit takes t ∈ [0, 1] and its embedder multiplies by 1000; diffusers takes the timestep itself → t·1000.
- SD3 sinusoid: diffusers `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)` = [cos, sin] with
  frequencies 10000^(−k/128), exactly minidit's `timestep_embedding`.
- DiT sinusoid: diffusers' DiT port uses `downscale_freq_shift=1`, i.e. frequencies 10000^(−k/127), while
  facebookresearch/DiT (and minidit) use 10000^(−k/128). The frequencies are not weights, so no weight mapping can
  make the two agree: the DiT test sets diffusers' shift to 0 and separately shows that the default differs.
- diffusers' DiT gives every block its own copy of the timestep MLP and label table (`norm1.emb`); the original
  DiT has one. The mapping copies minidit's single embedder into every block.
- adaLN chunk order: minidit, DiT and sd3-ref use (shift, scale[, gate]); diffusers' `AdaLayerNormContinuous`
  (SD3's final norm and the pre-only text norm of the last block) uses (scale, shift): the mapping swaps halves.
- fused vs split projections: minidit's qkv Linear (3D rows: q, k, v) → diffusers' to_q/to_k/to_v (image) and
  add_q_proj/add_k_proj/add_v_proj (text).
- joint sequence order: minidit (like sd3-ref) concatenates [text, image], diffusers [image, text]; attention is
  permutation-equivariant, so the split-back outputs agree.
- diffusers' `JointAttnProcessor2_0` ignores attention masks, so the SD3 parity uses unpadded text; the padding
  mask is tested against an independent reference (truncated text) in tests/test_mmdit.py.
"""

from __future__ import annotations

import pytest
import torch

from minidit.ddpm import DDPMSchedule, respaced_steps
from minidit.mmdit import MMDiT, MMDiTBlock, MMDiTConfig
from minidit.models import DiT, DiTBlock, DiTConfig, get_config
from minidit.sampling import sample

diffusers = pytest.importorskip("diffusers")
from diffusers import DiTTransformer2DModel, SD3Transformer2DModel  # noqa: E402
from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock  # noqa: E402


# ---- weight mapping (minidit → diffusers) ------------------------------------------------------------------
def _copy(dst: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    assert dst.weight.shape == weight.shape, (dst.weight.shape, weight.shape)
    dst.weight.data.copy_(weight)
    if bias is not None:
        dst.bias.data.copy_(bias)


def _linear(dst: torch.nn.Module, src: torch.nn.Linear) -> None:
    _copy(dst, src.weight, src.bias)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    """(shift, scale) rows → (scale, shift) rows, for diffusers' AdaLayerNormContinuous."""
    a, b = x.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


@torch.no_grad()
def mmdit_block_to_diffusers(ours: MMDiTBlock, ref: JointTransformerBlock) -> None:
    """MMDiTBlock → JointTransformerBlock.

    adaLN_img[1] → norm1.linear;  adaLN_txt[1] → norm1_context.linear (halves swapped when pre-only);
    attn.qkv_img (q; k; v) → attn.to_q / to_k / to_v;  attn.qkv_txt → attn.add_q_proj / add_k_proj / add_v_proj;
    attn.{q,k}_norm → attn.norm_{q,k};  attn.{q,k}_norm_txt → attn.norm_added_{q,k};
    attn.proj_img → attn.to_out[0];  attn.proj_txt → attn.to_add_out;
    mlp_img.fc1 / fc2 → ff.net[0].proj / ff.net[2];  mlp_txt → ff_context (both absent when pre-only).
    """
    _linear(ref.norm1.linear, ours.adaLN_img[1])
    txt_ada = ours.adaLN_txt[1]
    if ours.pre_only:
        _copy(ref.norm1_context.linear, _swap_halves(txt_ada.weight), _swap_halves(txt_ada.bias))
    else:
        _linear(ref.norm1_context.linear, txt_ada)
    a, ra = ours.attn, ref.attn
    for lin, names in ((a.qkv_img, ("to_q", "to_k", "to_v")), (a.qkv_txt, ("add_q_proj", "add_k_proj", "add_v_proj"))):
        for w, b, name in zip(lin.weight.chunk(3), lin.bias.chunk(3), names):
            _copy(getattr(ra, name), w, b)
    if ra.norm_q is not None:
        for mine, theirs in ((a.q_norm, ra.norm_q), (a.k_norm, ra.norm_k),
                             (a.q_norm_txt, ra.norm_added_q), (a.k_norm_txt, ra.norm_added_k)):
            theirs.weight.copy_(mine.weight)
    _linear(ra.to_out[0], a.proj_img)
    _linear(ref.ff.net[0].proj, ours.mlp_img.fc1)
    _linear(ref.ff.net[2], ours.mlp_img.fc2)
    if not ours.pre_only:
        _linear(ra.to_add_out, a.proj_txt)
        _linear(ref.ff_context.net[0].proj, ours.mlp_txt.fc1)
        _linear(ref.ff_context.net[2], ours.mlp_txt.fc2)


@torch.no_grad()
def mmdit_to_diffusers(ours: MMDiT, ref: SD3Transformer2DModel) -> None:
    """MMDiT → SD3Transformer2DModel.

    x_embedder.proj → pos_embed.proj (the position table is not copied: the test checks it is equal);
    context_embedder → context_embedder;  t_embedder.mlp[0] / [2] → time_text_embed.timestep_embedder.linear_1 / 2;
    y_embedder.mlp[0] / [2] → time_text_embed.text_embedder.linear_1 / 2;  blocks[i] → transformer_blocks[i];
    final_layer.adaLN_modulation[1] → norm_out.linear (halves swapped);  final_layer.linear → proj_out.
    """
    _linear(ref.pos_embed.proj, ours.x_embedder.proj)
    _linear(ref.context_embedder, ours.context_embedder)
    te = ref.time_text_embed
    _linear(te.timestep_embedder.linear_1, ours.t_embedder.mlp[0])
    _linear(te.timestep_embedder.linear_2, ours.t_embedder.mlp[2])
    _linear(te.text_embedder.linear_1, ours.y_embedder.mlp[0])
    _linear(te.text_embedder.linear_2, ours.y_embedder.mlp[2])
    for mine, theirs in zip(ours.blocks, ref.transformer_blocks, strict=True):
        mmdit_block_to_diffusers(mine, theirs)
    ada = ours.final_layer.adaLN_modulation[1]
    _copy(ref.norm_out.linear, _swap_halves(ada.weight), _swap_halves(ada.bias))
    _linear(ref.proj_out, ours.final_layer.linear)


@torch.no_grad()
def dit_block_to_diffusers(ours: DiTBlock, ref: BasicTransformerBlock) -> None:
    """DiTBlock → BasicTransformerBlock(norm_type='ada_norm_zero'): adaLN_modulation[1] → norm1.linear;
    attn.qkv → attn1.to_q/k/v; attn.proj → attn1.to_out[0]; cross_attn.q → attn2.to_q; cross_attn.kv (k; v) →
    attn2.to_k / to_v; cross_attn.proj → attn2.to_out[0]; mlp.fc1 / fc2 → ff.net[0].proj / ff.net[2]."""
    _linear(ref.norm1.linear, ours.adaLN_modulation[1])
    for w, b, name in zip(ours.attn.qkv.weight.chunk(3), ours.attn.qkv.bias.chunk(3), ("to_q", "to_k", "to_v")):
        _copy(getattr(ref.attn1, name), w, b)
    _linear(ref.attn1.to_out[0], ours.attn.proj)
    if ours.cross_attn is not None:
        ca = ours.cross_attn
        _linear(ref.attn2.to_q, ca.q)
        for w, b, name in zip(ca.kv.weight.chunk(2), ca.kv.bias.chunk(2), ("to_k", "to_v")):
            _copy(getattr(ref.attn2, name), w, b)
        _linear(ref.attn2.to_out[0], ca.proj)
    _linear(ref.ff.net[0].proj, ours.mlp.fc1)
    _linear(ref.ff.net[2], ours.mlp.fc2)


@torch.no_grad()
def dit_to_diffusers(ours: DiT, ref: DiTTransformer2DModel) -> None:
    """DiT → DiTTransformer2DModel: x_embedder.proj → pos_embed.proj; t_embedder.mlp[0] / [2] and
    y_embedder.embedding_table → EVERY block's norm1.emb.timestep_embedder.linear_1 / 2 and
    norm1.emb.class_embedder.embedding_table; blocks[i] → transformer_blocks[i] (see dit_block_to_diffusers);
    final_layer.adaLN_modulation[1] → proj_out_1 (same (shift, scale) order); final_layer.linear → proj_out_2."""
    _linear(ref.pos_embed.proj, ours.x_embedder.proj)
    for mine, theirs in zip(ours.blocks, ref.transformer_blocks, strict=True):
        emb = theirs.norm1.emb
        _linear(emb.timestep_embedder.linear_1, ours.t_embedder.mlp[0])
        _linear(emb.timestep_embedder.linear_2, ours.t_embedder.mlp[2])
        _copy(emb.class_embedder.embedding_table, ours.y_embedder.embedding_table.weight)
        dit_block_to_diffusers(mine, theirs)
    _linear(ref.proj_out_1, ours.final_layer.adaLN_modulation[1])
    _linear(ref.proj_out_2, ours.final_layer.linear)


@torch.no_grad()
def randomize(model: torch.nn.Module, std: float = 0.05) -> None:
    """Every parameter random (a fresh adaLN-Zero model outputs 0, which would make parity vacuous)."""
    for name, p in model.named_parameters():
        if name.split(".")[-2] in ("q_norm", "k_norm", "q_norm_txt", "k_norm_txt"):
            p.copy_(1 + std * torch.randn_like(p))  # QK-RMSNorm gains around 1
        else:
            p.normal_(0.0, std)


# ---- MMDiT vs SD3 --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pre_only", [False, True])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_mmdit_block_matches_joint_transformer_block(pre_only, qk_norm):
    D, H = 32, 4
    ours = MMDiTBlock(D, H, qk_norm=qk_norm, pre_only=pre_only)
    randomize(ours, 0.2)
    ref = JointTransformerBlock(D, H, D // H, context_pre_only=pre_only, qk_norm="rms_norm" if qk_norm else None)
    mmdit_block_to_diffusers(ours, ref)
    img, txt, c = torch.randn(2, 9, D), torch.randn(2, 5, D), torch.randn(2, D)
    with torch.no_grad():
        o_img, o_txt = ours(img, txt, c)
        r_txt, r_img = ref(hidden_states=img, encoder_hidden_states=txt, temb=c)
    assert o_img.abs().max() > 1e-2  # not a vacuous comparison of zeros
    assert torch.allclose(o_img, r_img, atol=1e-5, rtol=0)
    if pre_only:
        assert o_txt is None and r_txt is None
    else:
        assert torch.allclose(o_txt, r_txt, atol=1e-5, rtol=0)


def _sd3_pair(qk_norm: bool, S=16, p=2, C=4, D=64, H=4, depth=3, ctx=24, pooled=40, max_size=12):
    cfg = MMDiTConfig(input_size=S, in_channels=C, patch_size=p, dim=D, depth=depth, num_heads=H, context_dim=ctx,
                      pooled_dim=pooled, qk_norm=qk_norm, pos_embed_max_size=max_size, pos_base_size=S // p)
    ours = MMDiT(cfg)
    randomize(ours)
    ref = SD3Transformer2DModel(
        sample_size=S, patch_size=p, in_channels=C, num_layers=depth, attention_head_dim=D // H, num_attention_heads=H,
        joint_attention_dim=ctx, caption_projection_dim=D, pooled_projection_dim=pooled, out_channels=C,
        pos_embed_max_size=max_size, qk_norm="rms_norm" if qk_norm else None,
    )
    mmdit_to_diffusers(ours, ref)
    return ours.eval(), ref.eval()


@pytest.mark.parametrize("qk_norm", [False, True])
def test_mmdit_matches_sd3_transformer(qk_norm):
    ours, ref = _sd3_pair(qk_norm)
    # SD3's position table: arange(max) · base/max positions, 2D sin-cos, then the centre crop per resolution
    assert torch.allclose(ours.pos_table, ref.pos_embed.pos_embed[0], atol=1e-6)
    assert ref.transformer_blocks[-1].context_pre_only and ours.blocks[-1].pre_only
    t = torch.tensor([0.03, 0.5, 0.97])
    ctx, pooled = torch.randn(3, 7, 24), torch.randn(3, 40)
    for H, W in ((16, 16), (12, 8), (24, 24)):  # the training size, a smaller crop, the whole 12×12 table
        x = torch.randn(3, 4, H, W)
        with torch.no_grad():
            out = ours(x, t, pooled, ctx)
            want = ref(x, ctx, pooled, t * 1000).sample  # diffusers takes the timestep itself
        assert out.shape == want.shape == x.shape
        assert out.abs().max() > 0.1
        assert torch.allclose(out, want, atol=1e-5, rtol=0), (H, W, (out - want).abs().max())


def test_sd3_parity_is_sensitive_to_each_convention():
    """The mapping is not vacuous: the un-swapped final norm, or raw t instead of t·1000, breaks parity."""
    ours, ref = _sd3_pair(True)
    x, t, ctx, pooled = torch.randn(2, 4, 16, 16), torch.rand(2), torch.randn(2, 5, 24), torch.randn(2, 40)
    with torch.no_grad():
        out = ours(x, t, pooled, ctx)
        assert not torch.allclose(out, ref(x, ctx, pooled, t).sample, atol=1e-3)
        ada = ours.final_layer.adaLN_modulation[1]
        ref.norm_out.linear.weight.copy_(ada.weight)
        ref.norm_out.linear.bias.copy_(ada.bias)
        assert not torch.allclose(out, ref(x, ctx, pooled, t * 1000).sample, atol=1e-3)


# ---- DiT vs diffusers' DiT -------------------------------------------------------------------------------------
def _dit_pair():
    cfg = DiTConfig(input_size=16, in_channels=4, patch_size=2, dim=64, depth=2, num_heads=4, num_classes=10)
    ours = DiT(cfg)
    randomize(ours)
    ref = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
                                num_layers=2, sample_size=16, patch_size=2, num_embeds_ada_norm=10,
                                norm_eps=1e-6)  # DiT's LayerNorm eps (diffusers' default is 1e-5)
    dit_to_diffusers(ours, ref)
    return ours.eval(), ref.eval()


def test_dit_matches_diffusers_dit_transformer():
    ours, ref = _dit_pair()
    for block in ref.transformer_blocks:  # use DiT's frequencies 10000^(−k/128) (see the module docstring)
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    x, t, y = torch.randn(3, 4, 16, 16), torch.tensor([0.0, 0.4, 1.0]), torch.tensor([1, 7, 10])  # 10 = null label
    with torch.no_grad():
        out = ours(x, t, y)
        want = ref(x, t * 1000, y).sample
    assert out.shape == want.shape == (3, 4, 16, 16) and out.abs().max() > 0.1
    assert torch.allclose(out, want, atol=1e-5, rtol=0), (out - want).abs().max()


def test_diffusers_dit_default_timestep_frequencies_differ_from_dit():
    """Why the DiT test patches diffusers: with its default downscale_freq_shift=1 the outputs differ."""
    ours, ref = _dit_pair()
    assert ref.transformer_blocks[0].norm1.emb.time_proj.downscale_freq_shift == 1
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([0.3, 0.8]), torch.tensor([2, 3])
    with torch.no_grad():
        assert not torch.allclose(ours(x, t, y), ref(x, t * 1000, y).sample, atol=1e-3)
        t_zero = torch.zeros(2)  # at t = 0 every sinusoid is cos 0 / sin 0: the frequencies cannot matter
        assert torch.allclose(ours(x, t_zero, y), ref(x, t_zero, y).sample, atol=1e-5, rtol=0)


def test_dit_cross_attention_block_matches_basic_transformer_block_with_mask():
    """DiTBlock's PixArt-style cross-attention path (ungated, zero-init output) = diffusers' ada_norm_zero block."""
    D, H, Dc, n_cls = 32, 4, 24, 5
    ours = DiTBlock(D, H, context_dim=Dc)
    randomize(ours, 0.2)
    ref = BasicTransformerBlock(D, H, D // H, cross_attention_dim=Dc, activation_fn="gelu-approximate",
                                num_embeds_ada_norm=n_cls, attention_bias=True, norm_type="ada_norm_zero",
                                norm_elementwise_affine=False, norm_eps=1e-6)
    dit_block_to_diffusers(ours, ref)
    ref.norm1.emb.time_proj.downscale_freq_shift = 0
    # c = the conditioning vector diffusers' block builds itself from (timestep, label)
    t, y = torch.tensor([120.0, 870.0]), torch.tensor([1, 4])
    with torch.no_grad():
        c = ref.norm1.emb(t, y, hidden_dtype=torch.float32)
        x, ctx = torch.randn(2, 9, D), torch.randn(2, 6, Dc)
        mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
        bias = torch.zeros(2, 1, 6).masked_fill(~mask[:, None], float("-inf"))  # diffusers: additive (B, 1, L)
        out = ours(x, c, ctx, mask)
        want = ref(x, encoder_hidden_states=ctx, encoder_attention_mask=bias, timestep=t, class_labels=y)
    assert out.abs().max() > 0.1
    assert torch.allclose(out, want, atol=1e-5, rtol=0), (out - want).abs().max()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddpm_ancestral_sampler_matches_diffusers_ddpm_scheduler(schedule, spacing, prediction):
    """minidit's ancestral sampler = diffusers' DDPMScheduler (ε- or v-prediction, clipped x0, posterior variance β̃)
    stepped over the same respaced timesteps with the same random draws, for a DiT whose every weight is random
    (so its output depends on x, t and y)."""
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    model = DiT(get_config("mnist-tiny")).eval()
    randomize(model, 0.05)
    sched = DDPMSchedule(schedule)
    labels = torch.tensor([0, 3, 7, 10])  # 10: the null label
    z = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ks = respaced_steps(sched, 12, spacing)
    assert (ks[-1] == 0) == (spacing == "linspace")
    ours = sample(model, labels, steps=12, sampler="ancestral", schedule=sched, spacing=spacing, noise=z.clone(),
                  generator=torch.Generator().manual_seed(7), prediction=prediction)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, clip_sample=True,
                        beta_schedule="linear" if schedule == "linear" else "squaredcos_cap_v2",
                        variance_type="fixed_small",
                        prediction_type="epsilon" if prediction == "eps" else "v_prediction")
    ref.set_timesteps(timesteps=ks)
    assert ref.timesteps.tolist() == ks
    assert torch.allclose(ref.alphas_cumprod.double(), sched.alphas_cumprod, atol=1e-6)
    g, x = torch.Generator().manual_seed(7), z.clone()
    with torch.no_grad():
        eps_first = model(x, torch.full((4,), ks[0]) / 1000, labels)
        assert eps_first.std() > 0.1  # not a vacuous comparison: the random DiT predicts real noise
        assert not torch.allclose(eps_first[0], model(x, torch.full((4,), ks[1]) / 1000, labels)[0], atol=1e-3)
        assert not torch.allclose(eps_first[1], model(x, torch.full((4,), ks[0]) / 1000, labels.flip(0))[1],
                                  atol=1e-3)
        for t in ref.timesteps:
            eps = model(x, torch.full((4,), int(t)) / 1000, labels)  # minidit time = k / 1000
            x = ref.step(eps, t, x, generator=g).prev_sample
    assert ours.abs().max() > 0.1
    assert torch.allclose(ours, x, atol=1e-4), (ours - x).abs().max()


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_sampler_matches_diffusers_ddim_scheduler(prediction):
    """minidit's DDIM (η = 0, trailing steps, clipped x0) = diffusers' DDIMScheduler(timestep_spacing="trailing"),
    for ε- and v-prediction, on a DiT whose every weight is random. 10 steps: diffusers steps back by T // steps,
    which equals the trailing respacing only when the step count divides T."""
    from diffusers import DDIMScheduler

    torch.manual_seed(1)
    model = DiT(get_config("mnist-tiny")).eval()
    randomize(model, 0.05)
    sched = DDPMSchedule("linear")
    labels = torch.tensor([2, 5, 10])
    z = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ours = sample(model, labels, steps=10, sampler="ddim", schedule=sched, noise=z.clone(), prediction=prediction)
    ref = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        clip_sample=True, set_alpha_to_one=True, timestep_spacing="trailing",
                        prediction_type="epsilon" if prediction == "eps" else "v_prediction")
    ref.set_timesteps(10)
    assert ref.timesteps.tolist() == respaced_steps(sched, 10) == list(range(999, 0, -100))
    x = z.clone()
    with torch.no_grad():
        for t in ref.timesteps:
            out = model(x, torch.full((3,), int(t)) / 1000, labels)
            # use_clipped_model_output: ε recomputed from the clipped x̂0, as minidit (and DDPM's posterior) does
            x = ref.step(out, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    assert ours.abs().max() > 0.1
    assert torch.allclose(ours, x, atol=1e-4), (ours - x).abs().max()
