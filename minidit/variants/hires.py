"""High resolution (lesson 13): three ways up in resolution for text-to-image, from the package's own pieces.

- single stage: a DiT at the target resolution with full attention (`arch="dit"`) or tiles + pooled global tokens
  (`arch="window"`, minidit.variants.attention);
- a cascade (Ho et al. 2021): a base model at low resolution, then `SuperRes` (`arch="sr"`), a tiled DiT that denoises
  the image beside its upsampled low-resolution version, noise-augmented (`SuperResTrainer`, `upsample`);
- an hourglass (`arch="hourglass"`, after HDiT, Crowson et al. 2024): fine tokens attend within their tile and to
  pooled summaries, merge 2×2 into a coarse level with global attention and text, split back with a skip, and attend
  to their tile and to the coarse tokens (cross-resolution attention).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minidit.attention import AttentionModule, merge_heads
from minidit.embed import MlpEmbedder, TimestepEmbedder
from minidit.flow import euler_sample, flow_loss, interpolate
from minidit.models import DiT, DiTBlock, DiTConfig, FinalLayer, modulate
from minidit.t2i import TextToImage
from minidit.text import CaptionEncoder, caption_set
from minidit.tokens import PatchEmbed, sincos_2d, unpatchify
from minidit.train import Trainer
from minidit.variants.attention import VariantAttention, VariantConfig, VariantDiT, from_tiles, to_tiles
from minidit.variants.cost import FREQUENCY_DIM, dit_flops
from minidit.variants.scenes import scene_captions, scene_vocabulary

ARCHS = ("dit", "window", "hourglass", "sr")


@dataclass(frozen=True)
class HiresConfig:
    """One model of the study (saved as JSON with its weights); `dim`/`depth` are the global level's."""

    arch: str = "hourglass"
    caption_set: str = "scenes"
    input_size: int = 64
    in_channels: int = 3
    patch_size: int = 4
    dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    window: int = 4  # tiles of window×window tokens (window, hourglass fine level, sr)
    global_tokens: int = 16  # window, sr: g² pooled tokens every query also sees
    fine_dim: int = 64  # hourglass: width of the fine level, and its blocks on the way down and on the way up
    fine_depth: int = 1
    low_size: int = 32  # sr: the resolution it upsamples from
    text_dim: int = 64
    text_depth: int = 2
    text_heads: int = 4
    max_len: int = 16

    def __post_init__(self):
        grid = self.input_size // self.patch_size
        if self.arch not in ARCHS or self.input_size % self.patch_size or grid % self.window or grid % 2 \
                or self.dim % self.num_heads or self.fine_dim % (self.dim // self.num_heads) or self.low_size < 1:
            raise ValueError(f"invalid HiresConfig {self}: arch in {ARCHS}, patch_size dividing input_size into an "
                             "even grid that window divides, heads dividing dim and fine_dim")

    def to_dict(self) -> dict:
        return asdict(self)

    def backbone_config(self) -> DiTConfig:
        """A single-stage model's text DiT config: full attention (DiT) or tiles + global tokens (VariantDiT)."""
        kw = dict(input_size=self.input_size, in_channels=self.in_channels, patch_size=self.patch_size, dim=self.dim,
                  depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qk_norm=self.qk_norm,
                  num_classes=1, context_dim=self.text_dim, pooled_dim=self.text_dim)
        return DiTConfig(**kw) if self.arch == "dit" else VariantConfig(**kw, window=self.window,
                                                                        global_tokens=self.global_tokens)


# ---- cross-resolution attention and the hourglass ----------------------------------------------------------------
def cross_resolution_attention(q, k, v, k_coarse, v_coarse, grid: tuple[int, int], window: int) -> torch.Tensor:
    """Each fine query (B, H, T, d) on an h×w grid attends, in one softmax, to the keys of its own window×window tile
    and to all Tc coarse keys (B, H, Tc, d): (B, H, T, d). `window_mask(h, w, window, Tc)` is the same as a mask."""
    (h, w), n = grid, (grid[0] // window) * (grid[1] // window)
    qt, kt, vt = (to_tiles(z, h, w, window) for z in (q, k, v))  # (B, H, n, window², d)
    kt = torch.cat([kt, k_coarse[:, :, None].expand(-1, -1, n, -1, -1)], dim=3)  # (B, H, n, window² + Tc, d)
    vt = torch.cat([vt, v_coarse[:, :, None].expand(-1, -1, n, -1, -1)], dim=3)
    out = F.scaled_dot_product_attention(qt.flatten(1, 2), kt.flatten(1, 2), vt.flatten(1, 2))  # (B, H·n, win², d)
    return from_tiles(out.view_as(qt), h, w, window)  # (B, H, T, d)


class CrossResolutionAttention(AttentionModule):
    """Fine tokens (B, T, D) attend to their tile and to the coarse tokens (B, Tc, Dc), projected to keys/values."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], window: int, coarse_dim: int,
                 qk_norm: bool = False):
        super().__init__(dim, num_heads, qk_norm)
        self.grid, self.window = grid, window
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.kv_coarse = nn.Linear(coarse_dim, 2 * dim)  # the coarse tokens' keys and values

    def forward(self, x: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        (B, T, _), Tc = x.shape, coarse.shape[1]
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, T, d)
        kc, vc = self.kv_coarse(coarse).reshape(B, Tc, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = cross_resolution_attention(self.q_norm(q), self.k_norm(k), v, self.k_norm(kc), vc, self.grid,
                                         self.window)  # (B, H, T, d)
        return self.proj(merge_heads(out))  # (B, T, D)


def merge_tokens(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, g·g, D) row-major tokens → (B, (g/2)², 4·D): each 2×2 group becomes one token (HDiT's pixel unshuffle)."""
    B, _, D = x.shape
    x = x.reshape(B, grid // 2, 2, grid // 2, 2, D).permute(0, 1, 3, 2, 4, 5)  # (B, gy, gx, 2, 2, D)
    return x.reshape(B, (grid // 2) ** 2, 4 * D)


def split_tokens(x: torch.Tensor, grid: int) -> torch.Tensor:
    """The inverse of `merge_tokens`: (B, (g/2)², 4·D) → (B, g·g, D)."""
    B, _, D4 = x.shape
    x = x.reshape(B, grid // 2, grid // 2, 2, 2, D4 // 4).permute(0, 1, 3, 2, 4, 5)  # (B, gy, 2, gx, 2, D)
    return x.reshape(B, grid * grid, D4 // 4)


def narrow_block(block: nn.Module, cond_dim: int) -> nn.Module:
    """A block (or final layer) of a narrower level, regressing its adaLN parameters from the cond_dim-wide c."""
    block.adaLN_modulation[-1] = nn.Linear(cond_dim, block.adaLN_modulation[-1].out_features)
    block.init_weights()  # xavier, then zero the new adaLN regression (adaLN-Zero)
    return block


class CrossResolutionBlock(DiTBlock):
    """adaLN-Zero block whose attention is cross-resolution: forward(x, c, coarse)."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], window: int, coarse_dim: int,
                 mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__(dim, num_heads, mlp_ratio)
        self.attn = CrossResolutionAttention(dim, num_heads, grid, window, coarse_dim, qk_norm)
        narrow_block(self, coarse_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), coarse)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


def tiled_block(dim: int, cond_dim: int, num_heads: int, grid: int, window: int, global_tokens: int,
                mlp_ratio: float = 4.0, qk_norm: bool = False) -> DiTBlock:
    """A DiT block on tiles + pooled global tokens (minidit.variants.attention), conditioned on a cond_dim-wide c."""
    block = DiTBlock(dim, num_heads, mlp_ratio)
    block.attn = VariantAttention(dim, num_heads, (grid, grid), window=window, global_tokens=global_tokens,
                                  qk_norm=qk_norm)
    return narrow_block(block, cond_dim)


class Hourglass(nn.Module):
    """Fine tokens (tiles + pooled 2×2 summaries) → merge → coarse DiT blocks (global attention, text) → split + skip
    → fine tokens (tiles + the coarse tokens) → patches; called as a text DiT: (x, t, pooled, context, mask)."""

    def __init__(self, config: HiresConfig):
        super().__init__()
        self.config = c = config
        self.grid = g = c.input_size // c.patch_size  # the fine grid's side
        fh = c.fine_dim // (c.dim // c.num_heads)  # fine heads: the coarse level's head dimension
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.fine_dim)
        self.register_buffer("pos_fine", sincos_2d(c.fine_dim, g)[None], persistent=False)  # (1, g², Df)
        self.register_buffer("pos_coarse", sincos_2d(c.dim, g // 2)[None], persistent=False)  # (1, g²/4, D)
        self.t_embedder, self.y_embedder = TimestepEmbedder(c.dim), MlpEmbedder(c.text_dim, c.dim)
        self.down = nn.ModuleList(tiled_block(c.fine_dim, c.dim, fh, g, c.window, (g // 2) ** 2, c.mlp_ratio,
                                              c.qk_norm) for _ in range(c.fine_depth))
        self.merge = nn.Linear(4 * c.fine_dim, c.dim)
        self.blocks = nn.ModuleList(DiTBlock(c.dim, c.num_heads, c.mlp_ratio, c.text_dim, c.qk_norm)
                                    for _ in range(c.depth))
        self.split = nn.Linear(c.dim, 4 * c.fine_dim)
        self.up = nn.ModuleList(CrossResolutionBlock(c.fine_dim, fh, (g, g), c.window, c.dim, c.mlp_ratio, c.qk_norm)
                                for _ in range(c.fine_depth))
        self.final_layer = narrow_block(FinalLayer(c.fine_dim, c.patch_size, c.in_channels), c.dim)
        self.grad_checkpointing = False
        for m in (self.x_embedder, self.t_embedder, self.y_embedder):
            m.init_weights()

    def forward(self, x, t, y, context, context_mask=None) -> torch.Tensor:
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        h = self.x_embedder(x) + self.pos_fine.to(x.dtype)  # (B, g², Df)
        for block in self.down:
            h = block(h, c)
        z = self.merge(merge_tokens(h, self.grid)) + self.pos_coarse.to(h.dtype)  # (B, g²/4, D)
        for block in self.blocks:
            z = block(z, c, context, context_mask)
        h = h + split_tokens(self.split(z), self.grid)  # (B, g², Df): the skip plus the coarse level's answer
        for block in self.up:
            h = block(h, c, z)
        return unpatchify(self.final_layer(h, c), self.config.patch_size, self.config.in_channels)  # (B, C, H, W)


# ---- the models: text-to-image, and the cascade's SR stage ------------------------------------------------------
class HiresT2I(TextToImage):
    """Caption encoder + a single-stage DiT, a tiled DiT or the hourglass: forward(x, t, y), y = caption ids."""

    def __init__(self, config: HiresConfig):
        nn.Module.__init__(self)  # TextToImage's forward, checks and caption ids, with these backbones
        self.config = c = config
        captions, words = (scene_captions(), scene_vocabulary()) if c.caption_set == "scenes" else \
            (caption_set(c.caption_set), None)  # the scenes bring their own words; the course sets use its vocabulary
        self.text = CaptionEncoder(captions, c.text_dim, c.text_depth, c.text_heads, c.max_len, words)
        kind = {"dit": DiT, "window": VariantDiT, "hourglass": Hourglass}[c.arch]
        self.backbone = kind(c if c.arch == "hourglass" else c.backbone_config())


class SuperRes(nn.Module):
    """Cascade stage 2: the velocity of the high-resolution x_t given `low` (B, C, s, s) — upsampled, concatenated
    with x_t — and its noise-augmentation level `aug` (B,), embedded like the time. Tiles + global tokens: a local
    task with a global glance. No text: the low-resolution image already holds the layout."""

    def __init__(self, config: HiresConfig):
        super().__init__()
        self.config = c = config
        g = c.input_size // c.patch_size
        self.x_embedder = PatchEmbed(c.patch_size, 2 * c.in_channels, c.dim)
        self.register_buffer("pos_embed", sincos_2d(c.dim, g)[None], persistent=False)  # (1, T, D)
        self.t_embedder, self.aug_embedder = TimestepEmbedder(c.dim), TimestepEmbedder(c.dim)
        self.blocks = nn.ModuleList(tiled_block(c.dim, c.dim, c.num_heads, g, c.window, c.global_tokens, c.mlp_ratio,
                                                c.qk_norm) for _ in range(c.depth))
        self.final_layer = FinalLayer(c.dim, c.patch_size, c.in_channels)
        self.grad_checkpointing = False
        for m in (self.x_embedder, self.t_embedder, self.aug_embedder):
            m.init_weights()

    def forward(self, x: torch.Tensor, t: torch.Tensor, low: torch.Tensor, aug: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)  # (B, C, H, W)
        h = self.x_embedder(torch.cat([x, up], dim=1)) + self.pos_embed.to(x.dtype)  # (B, T, D)
        c = self.t_embedder(t) + self.aug_embedder(aug)  # (B, D)
        for block in self.blocks:
            h = block(h, c)
        return unpatchify(self.final_layer(h, c), self.config.patch_size, self.config.in_channels)


class SuperResTrainer(Trainer):
    """The package's Trainer with the cascade's objective: the flow loss of the high-resolution image, the model given
    its area-downsampled copy noise-augmented to a level drawn from U(0, max_aug) (Ho et al. 2021, §4.1)."""

    def __init__(self, model: SuperRes, images: torch.Tensor, config, device=None, max_aug: float = 0.5):
        super().__init__(model, images, None, config, device)
        self.max_aug = max_aug

    def host_batch(self, step: int) -> dict[str, torch.Tensor]:
        B, s = self.cfg.batch_size, self.model.config.low_size
        sl = slice(self.rank * B // self.world, (self.rank + 1) * B // self.world)  # this process's part of the batch
        g = torch.Generator().manual_seed(2 * (self.cfg.seed * 1_000_003 + step) + 1)  # a pure function of (seed, step)
        aug, noise = self.max_aug * torch.rand(B, generator=g), torch.randn(B, self.images.shape[1], s, s, generator=g)
        return {**super().host_batch(step), "aug": aug[sl], "aug_noise": noise[sl]}

    def loss(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        low = F.interpolate(b["x0"], size=self.model.config.low_size, mode="area")  # (B, C, s, s)
        low = interpolate(low, b["aug_noise"], b["aug"])  # noise augmentation: the same path, at level aug
        return flow_loss(lambda x, t, y: self.net(x, t, low, b["aug"]), b["x0"], b["y"], b["t"], b["noise"])


@torch.no_grad()
def upsample(sr: SuperRes, low: torch.Tensor, steps: int = 20, aug: float = 0.1, seed: int = 0) -> torch.Tensor:
    """Cascade stage 2 at sampling: images (N, C, S, S) in [−1, 1] from low (N, C, s, s), noise-augmented to `aug`."""
    g, c, device, was = torch.Generator().manual_seed(seed), sr.config, next(sr.parameters()).device, sr.training
    a = torch.full((low.shape[0],), float(aug))  # (N,)
    low = interpolate(low.cpu(), torch.randn(low.shape, generator=g), a).to(device)  # (N, C, s, s)
    noise = torch.randn(low.shape[0], c.in_channels, c.input_size, c.input_size, generator=g).to(device)
    x = euler_sample(lambda x, t: sr.eval()(x, t, low, a.to(device)), noise, steps).clamp(-1, 1).cpu()
    sr.train(was)
    return x


def hires_flops(config: HiresConfig) -> int:
    """Forward FLOPs per image (2 × multiply-adds, `cost`'s accounting: matrix products only), text encoder included:
    a single-stage model as `cost.dit_flops` counts it; the hourglass and the SR stage term by term."""
    c = config
    T, p2c, Lt, Dt, D, Df = (c.input_size // c.patch_size) ** 2, c.patch_size**2 * c.in_channels, c.max_len, \
        c.text_dim, c.dim, c.fine_dim

    def block(T: int, D: int, keys: int, cond: int) -> int:  # Linears, attention over `keys` keys, adaLN (per image)
        return 2 * T * (4 * D * D + 2 * D * int(D * c.mlp_ratio)) + 4 * T * keys * D + 2 * cond * 6 * D

    text = c.text_depth * block(Lt, Dt, Lt, 0)  # the caption encoder reads all max_len positions
    if c.arch in ("dit", "window"):
        return dit_flops(c.backbone_config(), context_len=Lt) + text
    time = 2 * (FREQUENCY_DIM * D + D * D)  # one timestep MLP
    if c.arch == "sr":  # two "timestep" MLPs (t and aug), 2C input channels, tiles + global tokens
        return 2 * time + 2 * T * 2 * p2c * D + c.depth * block(T, D, c.window**2 + c.global_tokens, D) \
            + 2 * D * 2 * D + 2 * T * D * p2c
    Tc, keys = T // 4, c.window**2 + T // 4  # coarse tokens; a fine query's keys: its tile + T/4 pooled or coarse
    cross = 2 * Tc * 2 * D * D + 2 * Lt * Dt * 2 * D + 4 * Tc * Lt * D  # a coarse block's text cross-attention
    return (text + time + 2 * (Dt * D + D * D) + 2 * T * p2c * Df  # + pooled MLP, patch embedding
            + c.fine_depth * (2 * block(T, Df, keys, D) + 2 * Tc * D * 2 * Df)  # fine blocks down, up (+ coarse k, v)
            + 2 * 2 * Tc * 4 * Df * D + c.depth * (block(Tc, D, Tc, D) + cross)  # merge + split, coarse blocks
            + 2 * D * 2 * Df + 2 * T * Df * p2c)  # final layer
