"""SD3's MMDiT (Esser et al. 2024, §4): two weight sets, one joint attention over [text; image].

Each modality keeps its own adaLN modulation, qkv projection, output projection and MLP ("multi-modal"), but
there is ONE attention: text and image queries/keys/values are concatenated along the sequence, attended
together, and split back. Information flows both ways in every block; there is no separate cross-attention.
A DiT that concatenates text and image tokens is the special case where both modalities share one weight set.

Layout follows Stability-AI/sd3-ref `mmdit.py` (context first in the joint sequence, (shift, scale, gate) chunk
order as in DiT); `tests/test_parity_diffusers.py` maps these weights onto diffusers' `SD3Transformer2DModel`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from minidit.attention import QKNorm, _Recordable, attention, merge_heads, split_heads
from minidit.blocks import FinalLayer, Mlp, _xavier_linears, gated_add, modulate
from minidit.checkpoint import config_from_dict
from minidit.embed import TimestepEmbedder, init_mlp
from minidit.models import apply_block, backbone_checks
from minidit.tokens import PatchEmbed, add_positions, crop_pos_embed, sincos_2d, unpatchify


def joint_attention(
    q_txt: torch.Tensor,
    k_txt: torch.Tensor,
    v_txt: torch.Tensor,
    q_img: torch.Tensor,
    k_img: torch.Tensor,
    v_img: torch.Tensor,
    txt_mask: torch.Tensor | None = None,
    return_weights: bool = False,
):
    """One attention over the concatenated [text; image] sequence, split back into (text out, image out).

    q/k/v_txt (B, H, L, d), q/k/v_img (B, H, T, d); txt_mask (B, L) bool, True = real text token (image tokens
    are always attended to). Returns (out_txt (B, H, L, d), out_img (B, H, T, d)) and, with return_weights,
    the joint weights (B, H, L+T, L+T) as a third element: rows/columns [:L] are text, [L:] are image.
    """
    if q_txt.ndim != 4 or q_img.ndim != 4 or q_txt.shape[-1] != q_img.shape[-1] or q_txt.shape[:2] != q_img.shape[:2]:
        raise ValueError(f"q_txt (B, H, L, d) and q_img (B, H, T, d) must share B, H, d; "
                         f"got {tuple(q_txt.shape)} and {tuple(q_img.shape)}")
    B, _, L, _ = q_txt.shape
    T = q_img.shape[2]
    q = torch.cat([q_txt, q_img], dim=2)  # (B, H, L+T, d)
    k = torch.cat([k_txt, k_img], dim=2)
    v = torch.cat([v_txt, v_img], dim=2)
    mask = None
    if txt_mask is not None:
        if txt_mask.shape != (B, L) or txt_mask.dtype != torch.bool:
            raise ValueError(f"txt_mask must be bool ({B}, {L}), got {txt_mask.dtype} {tuple(txt_mask.shape)}")
        mask = torch.cat([txt_mask, txt_mask.new_ones(B, T)], dim=1)  # (B, L+T)
    if return_weights:
        out, w = attention(q, k, v, mask, return_weights=True)
        return out[:, :, :L], out[:, :, L:], w
    out = attention(q, k, v, mask)  # (B, H, L+T, d)
    return out[:, :, :L], out[:, :, L:]


def check_text_inputs(context: torch.Tensor, pooled: torch.Tensor, context_mask: torch.Tensor | None, batch: int,
                      context_dim: int, pooled_dim: int) -> None:
    """ValueError unless context is (B, L, context_dim), pooled (B, pooled_dim) and context_mask None or bool (B, L)."""
    if not isinstance(context, torch.Tensor) or context.ndim != 3 or context.shape[0] != batch \
            or context.shape[2] != context_dim:
        raise ValueError(f"context must be (B={batch}, L, {context_dim}), got {getattr(context, 'shape', None)}")
    if not isinstance(pooled, torch.Tensor) or pooled.shape != (batch, pooled_dim):
        raise ValueError(f"pooled must be ({batch}, {pooled_dim}), got {getattr(pooled, 'shape', None)}")
    if context_mask is not None and (not isinstance(context_mask, torch.Tensor) or context_mask.dtype != torch.bool
                                     or context_mask.shape != context.shape[:2]):
        raise ValueError(f"context_mask must be bool {tuple(context.shape[:2])}, got "
                         f"{getattr(context_mask, 'dtype', None)} {tuple(getattr(context_mask, 'shape', ()))}")


class JointAttention(_Recordable):
    """Per-modality qkv (and optional QK-RMSNorm per head) → `joint_attention` → per-modality output projections.

    `pre_only=True` (SD3's last block): the text stream only contributes keys/values; its output is dropped,
    so it has no output projection. An `AttentionRecorder` receives the joint weights (B, H, L+T, L+T).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, pre_only: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.pre_only = num_heads, dim // num_heads, pre_only
        self.qkv_img = nn.Linear(dim, 3 * dim)
        self.qkv_txt = nn.Linear(dim, 3 * dim)
        self.q_norm_img, self.k_norm_img = self._qk_norm(qk_norm), self._qk_norm(qk_norm)
        self.q_norm_txt, self.k_norm_txt = self._qk_norm(qk_norm), self._qk_norm(qk_norm)
        self.proj_img = nn.Linear(dim, dim)
        self.proj_txt = None if pre_only else nn.Linear(dim, dim)

    def _qk_norm(self, on: bool) -> nn.Module:
        return QKNorm(self.head_dim) if on else nn.Identity()

    def _heads(self, qkv: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = qkv(x).split(x.shape[-1], dim=-1)  # (B, T, D) ×3
        return split_heads(q, self.num_heads), split_heads(k, self.num_heads), split_heads(v, self.num_heads)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        txt_mask: torch.Tensor | None = None,
        return_weights: bool = False,
    ):
        """img (B, T, D), txt (B, L, D) → (img out (B, T, D), txt out (B, L, D) or None when pre_only)."""
        q_i, k_i, v_i = self._heads(self.qkv_img, img)
        q_t, k_t, v_t = self._heads(self.qkv_txt, txt)
        q_i, k_i = self.q_norm_img(q_i), self.k_norm_img(k_i)
        q_t, k_t = self.q_norm_txt(q_t), self.k_norm_txt(k_t)
        want = return_weights or self.recorder is not None
        w = None
        if want:
            o_t, o_i, w = joint_attention(q_t, k_t, v_t, q_i, k_i, v_i, txt_mask, return_weights=True)
            if self.recorder is not None:
                self.recorder.add(self, w)
        else:
            o_t, o_i = joint_attention(q_t, k_t, v_t, q_i, k_i, v_i, txt_mask)
        out_img = self.proj_img(merge_heads(o_i))  # (B, T, D)
        out_txt = None if self.pre_only else self.proj_txt(merge_heads(o_t))  # (B, L, D)
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
        _xavier_linears(self)
        for ada in (self.adaLN_img, self.adaLN_txt):
            nn.init.zeros_(ada[-1].weight)
            nn.init.zeros_(ada[-1].bias)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        c: torch.Tensor,
        txt_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """img (B, T, D), txt (B, L, D), c (B, D) → (img, txt) updated (txt is None after a pre-only block)."""
        shift_i, scale_i, gate_i, shift_i2, scale_i2, gate_i2 = self.adaLN_img(c).chunk(6, dim=1)
        if self.pre_only:
            shift_t, scale_t = self.adaLN_txt(c).chunk(2, dim=1)
        else:
            shift_t, scale_t, gate_t, shift_t2, scale_t2, gate_t2 = self.adaLN_txt(c).chunk(6, dim=1)
        a_img, a_txt = self.attn(
            modulate(self.norm1_img(img), shift_i, scale_i), modulate(self.norm1_txt(txt), shift_t, scale_t), txt_mask
        )
        img = gated_add(img, gate_i, a_img)  # img + gate·a_img
        img = gated_add(img, gate_i2, self.mlp_img(modulate(self.norm2_img(img), shift_i2, scale_i2)))
        if self.pre_only:
            return img, None
        txt = gated_add(txt, gate_t, a_txt)
        txt = gated_add(txt, gate_t2, self.mlp_txt(modulate(self.norm2_txt(txt), shift_t2, scale_t2)))
        return img, txt


@dataclass(frozen=True)
class MMDiTConfig:
    """Everything that fixes an MMDiT's architecture (saved as JSON beside every checkpoint)."""

    input_size: int = 32  # training H = W (other sizes work up to pos_embed_max_size · patch_size)
    in_channels: int = 3
    patch_size: int = 4
    dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    context_dim: int = 64  # width of the text-encoder token states
    pooled_dim: int = 64  # width of the pooled text vector
    qk_norm: bool = True
    pos_embed_max_size: int | None = None  # side of the position table (SD3: 96 tokens); None = the training grid
    pos_base_size: int | None = None  # diffusers scales table positions by base/max (None = integer positions)

    def __post_init__(self):
        grid = self.input_size // max(self.patch_size, 1)
        checks = {
            **backbone_checks(self),
            "context_dim": self.context_dim >= 1,
            "pooled_dim": self.pooled_dim >= 1,
            "pos_embed_max_size": self.pos_embed_max_size is None or self.pos_embed_max_size >= grid,
            "pos_base_size": self.pos_base_size is None or self.pos_base_size >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid MMDiTConfig field(s) {bad}: " + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
                + " (need input_size % patch_size == 0, dim % 4 == 0, dim % num_heads == 0, "
                "pos_embed_max_size ≥ input_size / patch_size)"
            )

    @property
    def max_grid(self) -> int:
        return self.pos_embed_max_size or self.input_size // self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MMDiTConfig:
        return config_from_dict(cls, d)


class MMDiT(nn.Module):
    """SD3-style MMDiT: patch tokens + cropped 2D sin-cos positions, text tokens, c = t_emb + MLP(pooled) → velocity.

    forward(x, t, context, pooled, context_mask) with x (B, C, H, W), t ∈ [0, 1] (B,) (0 = data, 1 = noise; the
    timestep embedder sees t·1000), context (B, L, context_dim) text token states, pooled (B, pooled_dim),
    context_mask (B, L) bool (True = real token). Text tokens get no positions here: the text encoder has its own.
    """

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = c = config
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.dim)
        self.context_embedder = nn.Linear(c.context_dim, c.dim)
        self.t_embedder = TimestepEmbedder(c.dim)
        self.pooled_embedder = nn.Sequential(nn.Linear(c.pooled_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        table = sincos_2d(c.dim, c.max_grid, base_size=c.pos_base_size)  # (S·S, D)
        self.register_buffer("pos_table", table, persistent=False)
        self.blocks = nn.ModuleList(
            MMDiTBlock(c.dim, c.num_heads, c.mlp_ratio, qk_norm=c.qk_norm, pre_only=i == c.depth - 1)
            for i in range(c.depth)
        )
        self.final_layer = FinalLayer(c.dim, c.patch_size, c.in_channels)
        self.grad_checkpointing = False
        self.init_weights()

    def init_weights(self) -> None:
        """DiT's initialisation for both streams: xavier Linear/patch conv, N(0, 0.02) conditioning MLPs, zero adaLN."""
        self.x_embedder.init_weights()
        nn.init.xavier_uniform_(self.context_embedder.weight)
        nn.init.zeros_(self.context_embedder.bias)
        self.t_embedder.init_weights()
        init_mlp(self.pooled_embedder)
        for block in self.blocks:
            block.init_weights()
        self.final_layer.init_weights()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Positions of an h×w token grid: the centre crop of the (max_grid²) table (SD3), (h·w, D)."""
        return crop_pos_embed(self.pos_table, self.config.max_grid, h, w)

    def check_inputs(self, x, t, context, pooled, context_mask) -> None:
        c = self.config
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != c.in_channels or not x.is_floating_point():
            raise ValueError(f"x must be a float tensor (B, {c.in_channels}, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        B, _, H, W = x.shape
        if H % c.patch_size or W % c.patch_size or max(H, W) // c.patch_size > c.max_grid:
            raise ValueError(f"image {H}×{W} must be divisible by patch {c.patch_size} and at most "
                             f"{c.max_grid * c.patch_size} pixels a side (pos_embed_max_size {c.max_grid})")
        if not isinstance(t, torch.Tensor) or t.shape != (B,):
            raise ValueError(f"t must be a tensor of shape ({B},), got {getattr(t, 'shape', type(t).__name__)}")
        check_text_inputs(context, pooled, context_mask, B, c.context_dim, c.pooled_dim)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.check_inputs(x, t, context, pooled, context_mask)
        p = self.config.patch_size
        h, w = x.shape[2] // p, x.shape[3] // p
        img = add_positions(self.x_embedder(x), self.pos_embed(h, w))  # (B, T, D)
        txt = self.context_embedder(context)  # (B, L, D)
        c = self.t_embedder(t) + self.pooled_embedder(pooled)  # (B, D)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            img, txt = apply_block(block, ckpt, img, txt, c, context_mask)  # (B, T, D), (B, L, D)
        out = self.final_layer(img, c)  # (B, T, p·p·C)
        return unpatchify(out, p, self.config.in_channels, h, w)  # (B, C, H, W)
