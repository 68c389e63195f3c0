"""SD3's MMDiT (Esser et al. 2024, §4): two weight sets, one joint attention over [text; image].

Each modality keeps its own adaLN modulation, qkv projection, output projection and MLP ("multi-modal"), but
there is ONE attention: text and image queries/keys/values are concatenated along the sequence, attended
together, and split back. Information flows both ways in every block; there is no separate cross-attention.
A DiT that concatenates text and image tokens is the special case where both modalities share one weight set.

Layout follows Stability-AI/sd3-ref `mmdit.py` (context first in the joint sequence, (shift, scale, gate) chunk
order as in DiT); `tests/test_parity_diffusers.py` maps these weights onto diffusers' `SD3Transformer2DModel`.
The embedders, the final layer and the input checks are DiT's (minidit.models).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minidit.attention import AttentionModule, QKNorm, attention, merge_heads
from minidit.embed import MlpEmbedder, TimestepEmbedder
from minidit.models import DiTConfig, FinalLayer, Mlp, check_dit_inputs, modulate, run_block, xavier_init, zero_init
from minidit.tokens import PatchEmbed, crop_pos_embed, sincos_2d, unpatchify


def concat_text_image(txt: tuple, img: tuple, txt_mask: torch.Tensor | None = None):
    """[text; image] along the sequence for each of q, k, v → (q, k, v (B, H, L+T, d), joint key mask (B, L+T))."""
    q, k, v = (torch.cat([a, b], dim=2) for a, b in zip(txt, img))
    B, T = q.shape[0], img[0].shape[2]
    return q, k, v, None if txt_mask is None else torch.cat([txt_mask, txt_mask.new_ones(B, T)], dim=1)


def joint_attention(q_txt, k_txt, v_txt, q_img, k_img, v_img, txt_mask: torch.Tensor | None = None,
                    return_weights: bool = False):
    """One attention over the concatenated [text; image] sequence, split back into (text out, image out).

    q/k/v_txt (B, H, L, d), q/k/v_img (B, H, T, d); txt_mask (B, L) bool, True = real text token (image tokens
    are always attended to). Returns (out_txt (B, H, L, d), out_img (B, H, T, d)) and, with return_weights,
    the joint weights (B, H, L+T, L+T) as a third element: rows/columns [:L] are text, [L:] are image.
    """
    L = q_txt.shape[2]
    q, k, v, mask = concat_text_image((q_txt, k_txt, v_txt), (q_img, k_img, v_img), txt_mask)
    out = attention(q, k, v, mask, return_weights)
    out, w = out if return_weights else (out, None)
    return (out[:, :, :L], out[:, :, L:]) + ((w,) if return_weights else ())


class JointAttention(AttentionModule):
    """Per-modality qkv (and optional QK-RMSNorm per head) → joint attention → per-modality output projections.

    `pre_only=True` (SD3's last block): the text stream only contributes keys/values; its output is dropped,
    so it has no output projection. An `AttentionRecorder` receives the joint weights (B, H, L+T, L+T).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, pre_only: bool = False):
        super().__init__(dim, num_heads, qk_norm)  # q_norm, k_norm: the image stream's
        self.pre_only = pre_only
        self.qkv_img, self.qkv_txt = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)
        self.q_norm_txt = QKNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm_txt = QKNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj_img = nn.Linear(dim, dim)
        self.proj_txt = None if pre_only else nn.Linear(dim, dim)

    def heads(self, qkv: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, d)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, txt_mask: torch.Tensor | None = None,
                return_weights: bool = False):
        """img (B, T, D), txt (B, L, D) → (img out (B, T, D), txt out (B, L, D) or None when pre_only)."""
        q_i, k_i, v_i = self.heads(self.qkv_img, img)
        q_t, k_t, v_t = self.heads(self.qkv_txt, txt)
        q, k, v, mask = concat_text_image((self.q_norm_txt(q_t), self.k_norm_txt(k_t), v_t),
                                          (self.q_norm(q_i), self.k_norm(k_i), v_i), txt_mask)  # text first
        out, w = self.attend(q, k, v, mask, return_weights)  # (B, H, L+T, d)
        L = txt.shape[1]
        out_img = self.proj_img(merge_heads(out[:, :, L:]))  # (B, T, D)
        out_txt = None if self.pre_only else self.proj_txt(merge_heads(out[:, :, :L]))  # (B, L, D)
        return (out_img, out_txt, w) if return_weights else (out_img, out_txt)


class MMDiTBlock(nn.Module):
    """Two adaLN-Zero streams (image, text) that meet in one joint attention; a fresh block is the identity."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False, pre_only: bool = False):
        super().__init__()
        self.pre_only = pre_only
        self.norm1_img = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm1_txt = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_img = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        # pre-only text stream: only (shift, scale) for its attention input; no gate, no MLP
        self.adaLN_txt = nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if pre_only else 6) * dim))
        self.attn = JointAttention(dim, num_heads, qk_norm=qk_norm, pre_only=pre_only)
        self.norm2_img = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp_img = Mlp(dim, int(dim * mlp_ratio))
        if not pre_only:
            self.norm2_txt = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp_txt = Mlp(dim, int(dim * mlp_ratio))
        self.init_weights()

    def init_weights(self) -> None:
        """Xavier for every Linear, then zero both adaLN regressions (adaLN-Zero for both streams)."""
        xavier_init(self)
        zero_init(self.adaLN_img[-1], self.adaLN_txt[-1])

    def forward(self, img: torch.Tensor, txt: torch.Tensor, c: torch.Tensor, txt_mask: torch.Tensor | None = None):
        """img (B, T, D), txt (B, L, D), c (B, D) → (img, txt) updated (txt is None after a pre-only block)."""
        shift_i, scale_i, gate_i, shift_i2, scale_i2, gate_i2 = self.adaLN_img(c).chunk(6, dim=1)
        mod_t = self.adaLN_txt(c).chunk(2 if self.pre_only else 6, dim=1)
        a_img, a_txt = self.attn(modulate(self.norm1_img(img), shift_i, scale_i),
                                 modulate(self.norm1_txt(txt), mod_t[0], mod_t[1]), txt_mask)
        img = img + gate_i.unsqueeze(1) * a_img
        img = img + gate_i2.unsqueeze(1) * self.mlp_img(modulate(self.norm2_img(img), shift_i2, scale_i2))
        if self.pre_only:
            return img, None
        _, _, gate_t, shift_t2, scale_t2, gate_t2 = mod_t
        txt = txt + gate_t.unsqueeze(1) * a_txt
        txt = txt + gate_t2.unsqueeze(1) * self.mlp_txt(modulate(self.norm2_txt(txt), shift_t2, scale_t2))
        return img, txt


@dataclass(frozen=True)
class MMDiTConfig(DiTConfig):
    """An MMDiT's architecture: DiT's fields (num_classes unused) plus SD3's resolution-independent positions."""

    input_size: int = 32  # training H = W (other sizes work up to pos_embed_max_size · patch_size)
    in_channels: int = 3
    patch_size: int = 4
    context_dim: int = 64  # width of the text-encoder token states
    pooled_dim: int = 64  # width of the pooled text vector
    qk_norm: bool = True
    pos_embed_max_size: int | None = None  # side of the position table (SD3: 192); None = the training grid
    pos_base_size: int | None = None  # diffusers scales table positions by base/max (None = integer positions)

    def __post_init__(self):
        super().__post_init__()
        if self.context_dim is None or self.pooled_dim is None or self.max_grid < self.input_size // self.patch_size:
            raise ValueError(f"an MMDiT needs context_dim, pooled_dim and pos_embed_max_size ≥ input_size / "
                             f"patch_size, got {self.context_dim}, {self.pooled_dim}, {self.pos_embed_max_size}")

    @property
    def max_grid(self) -> int:
        return self.pos_embed_max_size or self.input_size // self.patch_size


class MMDiT(nn.Module):
    """SD3-style MMDiT: patch tokens + cropped 2D sin-cos positions, text tokens, c = t_emb + MLP(pooled) → velocity.

    forward(x, t, y, context, context_mask) with x (B, C, H, W), t ∈ [0, 1] (B,), y the pooled text (B, pooled_dim),
    context (B, L, context_dim) text token states, context_mask (B, L) bool (True = real token). Text tokens get no
    positions here: the text encoder has its own.
    """

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = c = config
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.dim)
        self.context_embedder = nn.Linear(c.context_dim, c.dim)
        self.t_embedder = TimestepEmbedder(c.dim)
        self.y_embedder = MlpEmbedder(c.pooled_dim, c.dim)
        table = sincos_2d(c.dim, c.max_grid, base_size=c.pos_base_size)  # (S·S, D)
        self.register_buffer("pos_table", table, persistent=False)
        self.blocks = nn.ModuleList(MMDiTBlock(c.dim, c.num_heads, c.mlp_ratio, c.qk_norm, pre_only=i == c.depth - 1)
                                    for i in range(c.depth))
        self.final_layer = FinalLayer(c.dim, c.patch_size, c.in_channels)
        self.grad_checkpointing = False
        self.init_weights()

    def init_weights(self) -> None:
        """DiT's initialisation for both streams: xavier Linear/patch conv, N(0, 0.02) conditioning MLPs, zero adaLN."""
        self.x_embedder.init_weights()
        xavier_init(self.context_embedder)
        self.t_embedder.init_weights()
        self.y_embedder.init_weights()
        for block in self.blocks:
            block.init_weights()
        self.final_layer.init_weights()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        p = self.config.patch_size
        h, w = x.shape[2] // p, x.shape[3] // p
        img = self.x_embedder(x)  # (B, T, D)
        img = img + crop_pos_embed(self.pos_table, self.config.max_grid, h, w).to(img.dtype)  # tokens' dtype
        txt = self.context_embedder(context)  # (B, L, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        for block in self.blocks:
            img, txt = run_block(self, block, img, txt, c, context_mask)  # (B, T, D), (B, L, D)
        return unpatchify(self.final_layer(img, c), p, self.config.in_channels, h, w)  # (B, C, H, W)

    def __call__(self, x, t, y, context, context_mask=None) -> torch.Tensor:
        """Checks the inputs where code calls the model (any size up to the position table's), then runs `forward`."""
        check_dit_inputs(self.config, x, t, y, context, context_mask, x_size=False)
        if max(x.shape[2:]) > self.config.max_grid * self.config.patch_size:
            raise ValueError(f"image {tuple(x.shape[2:])} is larger than the position table allows "
                             f"({self.config.max_grid * self.config.patch_size} pixels a side)")
        return super().__call__(x, t, y, context, context_mask)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
