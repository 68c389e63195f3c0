"""The DiT model (Peebles & Xie 2023): adaLN-Zero blocks, the final layer, named configs from CPU toys to XL/2."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from minidit.attention import Attention, CrossAttention
from minidit.embed import LabelEmbedder, MlpEmbedder, TimestepEmbedder
from minidit.tokens import PatchEmbed, check_image, sincos_2d, unpatchify


#################################################################################
#                              Core DiT building blocks                         #
#################################################################################
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x·(1 + scale) + shift, with (B, D) shift/scale broadcast over the T tokens of x (B, T, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Mlp(nn.Module):
    """Linear → tanh-GELU → Linear (DiT's feed-forward, hidden = mlp_ratio · dim)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def xavier_init(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear inside `module` (DiT's basic initialisation)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias) if m.bias is not None else None


def zero_init(*layers: nn.Linear) -> None:
    """Zero a Linear's weight and bias: the "Zero" of adaLN-Zero (and of every output that must start silent)."""
    for lin in layers:
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)


class DiTBlock(nn.Module):
    """adaLN-Zero block: (shift, scale, gate) × (attention, MLP) regressed from c; zero-init ⇒ identity at start.

    With `context_dim`, a cross-attention sublayer to a token sequence (e.g. text) sits between
    self-attention and the MLP (PixArt-α style); its output projection is zero-initialised too.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None,
                 qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.cross_attn = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.cross_attn = CrossAttention(dim, context_dim, num_heads, qk_norm=qk_norm)
        self.init_weights()

    def init_weights(self) -> None:
        """Xavier for every Linear, then zero the adaLN regression (and the cross-attention output)."""
        xavier_init(self)
        zero_init(self.adaLN_modulation[-1])
        if self.cross_attn is not None:
            zero_init(self.cross_attn.proj)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) image tokens, c (B, D) conditioning vector, context (B, L, context_dim) tokens."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then Linear to p·p·C per token; all zero-init, so a fresh DiT outputs exactly 0."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.init_weights()

    def init_weights(self) -> None:
        zero_init(self.linear, self.adaLN_modulation[-1])

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p·p·C)


#################################################################################
#                                 Configurations                                #
#################################################################################
@dataclass(frozen=True)
class DiTConfig:
    """Everything that fixes a DiT's architecture (saved as JSON beside every checkpoint).

    A class-conditional DiT embeds labels (`num_classes`, the null label is index num_classes). A text DiT
    (`pooled_dim` set) embeds a pooled caption vector instead and cross-attends to its tokens (`context_dim`).
    """

    input_size: int = 28  # H = W of the image or latent
    in_channels: int = 1
    patch_size: int = 2
    dim: int = 128  # hidden size D
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    context_dim: int | None = None  # cross-attention to a token sequence of this width (text)
    pooled_dim: int | None = None  # condition on a pooled vector of this width instead of a class label
    qk_norm: bool = False

    def __post_init__(self):
        bad = [name for name, ok in {
            "input_size/patch_size": self.patch_size >= 1 and self.input_size % self.patch_size == 0,
            "dim": self.dim >= 4 and self.dim % 4 == 0,  # the 2D sin-cos table splits D into four quarters
            "num_heads": self.num_heads >= 1 and self.dim % self.num_heads == 0,
            "depth": self.depth >= 1,
            "in_channels": self.in_channels >= 1,
            "mlp_ratio": self.mlp_ratio > 0,
            "num_classes": self.num_classes >= 1,
            "context_dim": self.context_dim is None or self.context_dim >= 1,
            "pooled_dim": self.pooled_dim is None or self.pooled_dim >= 1,
        }.items() if not ok]
        if bad:
            raise ValueError(f"invalid DiTConfig {bad} in {self}: need input_size % patch_size == 0, dim % 4 == 0, "
                             "dim % num_heads == 0, positive sizes")

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


# DiT's ImageNet setting: 256² images → 32×32×4 SD-VAE latents, 1000 classes (Table 1; we predict no variance).
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
CONFIGS: dict[str, DiTConfig] = {
    f"DiT-{name}/{p}": DiTConfig(input_size=32, in_channels=4, num_classes=1000, patch_size=p, depth=d, dim=w,
                                 num_heads=h)
    for name, (d, w, h) in _SIZES.items()
    for p in (2, 4, 8)
}
# CPU-sized models for 28×28 MNIST: 16 tokens of 7×7 pixels (`mnist-p7`) train fastest on 2 cores
CONFIGS.update({
    "mnist-tiny": DiTConfig(patch_size=4, dim=64, depth=2, num_heads=2),
    "mnist-p7": DiTConfig(patch_size=7, dim=128, depth=4, num_heads=4),
    "mnist-s4": DiTConfig(patch_size=4, dim=192, depth=6, num_heads=6),
    "mnist-s2": DiTConfig(patch_size=2, dim=128, depth=6, num_heads=4),
    # on the shipped VAE's latents (f = 4, c = 4: 4×8×8), patch 2 → 16 tokens, the same transformer as mnist-p7
    "mnist-latent-p2": DiTConfig(input_size=8, in_channels=4, patch_size=2, dim=128, depth=4, num_heads=4),
})


def get_config(name: str, **overrides) -> DiTConfig:
    """A named config, optionally with fields replaced (e.g. get_config('mnist-s4', depth=8))."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; choose one of {sorted(CONFIGS)}")
    return replace(CONFIGS[name], **overrides)


#################################################################################
#                                   The model                                   #
#################################################################################
class DiT(nn.Module):
    """Diffusion transformer: patch tokens + positions → adaLN-Zero blocks conditioned on c = t_emb + y_emb → patches.

    forward(x, t, y) predicts the rectified-flow velocity (or DDPM noise) for images x (B, C, H, W) at times
    t ∈ [0, 1] (B,) (0 = data, 1 = noise) with class labels y (B,) (y = num_classes is "no label"). A text DiT takes
    the pooled caption vector as y (B, pooled_dim) and the caption's tokens as context (B, L, context_dim).
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = c = config
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.dim)
        self.t_embedder = TimestepEmbedder(c.dim)
        self.y_embedder = (LabelEmbedder(c.num_classes, c.dim) if c.pooled_dim is None
                           else MlpEmbedder(c.pooled_dim, c.dim))
        pos = sincos_2d(c.dim, c.input_size // c.patch_size)  # (T, D), fixed
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)  # (1, T, D)
        self.blocks = nn.ModuleList(DiTBlock(c.dim, c.num_heads, c.mlp_ratio, c.context_dim, c.qk_norm)
                                    for _ in range(c.depth))
        self.final_layer = FinalLayer(c.dim, c.patch_size, c.in_channels)
        self.grad_checkpointing = False  # recompute each block's activations in backward instead of keeping them
        self.init_weights()

    def init_weights(self) -> None:
        """DiT's: xavier Linears and patch kernel, N(0, 0.02) label table and time MLP, zero adaLN and output."""
        self.x_embedder.init_weights()
        self.y_embedder.init_weights()
        self.t_embedder.init_weights()
        for block in self.blocks:
            block.init_weights()
        self.final_layer.init_weights()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.x_embedder(x)  # (B, T, D)
        x = x + self.pos_embed.to(x.dtype)  # the tokens' dtype (bf16 under autocast), not the image's
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        for block in self.blocks:
            x = run_block(self, block, x, c, context, context_mask)  # (B, T, D)
        x = self.final_layer(x, c)  # (B, T, p·p·C)
        return unpatchify(x, self.config.patch_size, self.config.in_channels)  # (B, C, H, W)

    def __call__(self, x, t, y, context=None, context_mask=None) -> torch.Tensor:
        """Checks the inputs where code calls the model (a clear error, not a shape mismatch deep inside)."""
        check_dit_inputs(self.config, x, t, y, context, context_mask)
        return super().__call__(x, t, y, context, context_mask)

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def run_block(model: nn.Module, block: nn.Module, *args) -> torch.Tensor:
    """block(*args); with `model.grad_checkpointing` while training, activations are recomputed in backward."""
    if model.grad_checkpointing and model.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def describe(x) -> str:
    """A short description of an argument for error messages: its dtype and shape, or its type."""
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def check_dit_inputs(c: DiTConfig, x, t, y, context=None, context_mask=None, x_size: bool = True) -> None:
    """ValueError naming what was expected and what came, for a DiT's (or MMDiT's) inputs."""
    check_image(x, c.patch_size)
    B = x.shape[0]
    if x.shape[1] != c.in_channels or not x.is_floating_point() or (x_size and x.shape[2:] != (c.input_size,) * 2):
        raise ValueError(f"x must be float (B, {c.in_channels}, {c.input_size}, {c.input_size}), got {describe(x)}")
    if not isinstance(t, torch.Tensor) or t.shape != (B,):
        raise ValueError(f"t must be a tensor of shape ({B},) in [0, 1], got {describe(t)}")
    if c.pooled_dim is not None:
        if not isinstance(y, torch.Tensor) or y.shape != (B, c.pooled_dim):
            raise ValueError(f"y must be the pooled text vector ({B}, {c.pooled_dim}), got {describe(y)}")
    elif not isinstance(y, torch.Tensor) or y.shape != (B,) or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"y must be integer class labels ({B},), got {describe(y)}")
    elif not torch.compiler.is_compiling() and B and not 0 <= int(y.min()) <= int(y.max()) <= c.num_classes:
        raise ValueError(f"labels must be in [0, {c.num_classes}] ({c.num_classes} = null), got "
                         f"[{int(y.min())}, {int(y.max())}]")
    if (context is None) != (c.context_dim is None):
        raise ValueError(f"this model {'needs' if c.context_dim else 'takes no'} context tokens"
                         + (f" (B, L, {c.context_dim})" if c.context_dim else ""))
    if context is not None and (not isinstance(context, torch.Tensor) or context.ndim != 3
                                or context.shape[0] != B or context.shape[2] != c.context_dim):
        raise ValueError(f"context must be ({B}, L, {c.context_dim}), got {describe(context)}")
    if context_mask is not None and (context is None or context_mask.dtype != torch.bool
                                     or context_mask.shape != context.shape[:2]):
        raise ValueError(f"context_mask must be bool (B, L) like the context, got {describe(context_mask)}")
    if context_mask is not None and not torch.compiler.is_compiling() and not bool(context_mask.any(1).all()):
        raise ValueError("every context_mask row needs at least one True (real) token")
