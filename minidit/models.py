"""The DiT model (Peebles & Xie 2023) and its named configurations, from CPU toys to DiT-XL/2."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from minidit.attention import ATTENTION_OPTIONS, check_attention_options
from minidit.blocks import CONDITIONING_BLOCKS, DiTBlock, FinalLayer, PlainFinalLayer
from minidit.checkpoint import config_from_dict
from minidit.embed import LabelEmbedder, TimestepEmbedder
from minidit.tokens import PatchEmbed, add_positions, sincos_2d, unpatchify


def backbone_checks(c) -> dict[str, bool]:
    """Field name → valid, for the image-transformer fields that DiTConfig and MMDiTConfig share."""
    return {
        "input_size": c.input_size >= 1,
        "in_channels": c.in_channels >= 1,
        "patch_size": c.patch_size >= 1 and c.input_size % c.patch_size == 0,
        "dim": c.dim >= 4 and c.dim % 4 == 0,  # the 2D sin-cos table splits D into four quarters
        "depth": c.depth >= 1,
        "num_heads": c.num_heads >= 1 and c.dim % c.num_heads == 0,
        "mlp_ratio": c.mlp_ratio > 0,
    }


def apply_block(block: nn.Module, checkpointed: bool, *args):
    """block(*args); with `checkpointed`, its activations are recomputed in backward instead of kept."""
    return checkpoint(block, *args, use_reentrant=False) if checkpointed else block(*args)


@dataclass(frozen=True)
class DiTConfig:
    """Everything that fixes a DiT's architecture (saved as JSON beside every checkpoint)."""

    input_size: int = 28  # H = W of the image or latent
    in_channels: int = 1
    patch_size: int = 2
    dim: int = 128  # hidden size D
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10  # the null label is index num_classes
    class_dropout: float = 0.1  # label dropout for classifier-free guidance (training mode only)
    learn_sigma: bool = False  # DiT's ImageNet models also predict a variance (doubles the output channels)
    context_dim: int | None = None  # cross-attention to a token sequence of this width (text)
    qk_norm: bool = False
    # how t and y enter the blocks (DiT Table 4): "adaln-zero" (DiTBlock), "adaln", "cross-attention", "in-context"
    conditioning: str = "adaln-zero"
    # attention variant (adaln-zero only): keyword options of minidit.attention.Attention — n_kv_heads, rope, alibi,
    # window, global_tokens (notebook 12). None = plain multi-head attention as in DiT. With rope or alibi the
    # blocks get relative positions and the absolute sin-cos table is not added.
    attn: dict | None = None

    def __post_init__(self):
        checks = {
            **backbone_checks(self),
            "num_classes": self.num_classes >= 1,
            "class_dropout": 0 <= self.class_dropout < 1,
            "context_dim": self.context_dim is None or self.context_dim >= 1,
            "conditioning": self.conditioning in CONDITIONING_BLOCKS
            and (self.conditioning == "adaln-zero" or (self.context_dim is None and not self.qk_norm)),
        }
        checks["attn"] = self.attn is None or (isinstance(self.attn, dict) and self.conditioning == "adaln-zero")
        bad = [k for k, ok in checks.items() if not ok]
        if not bad and self.attn is not None:
            unknown = set(self.attn) - set(ATTENTION_OPTIONS)
            if unknown:
                raise ValueError(f"unknown DiTConfig.attn option(s) {sorted(unknown)}; choose from {ATTENTION_OPTIONS}")
            grid = self.input_size // self.patch_size
            check_attention_options(self.num_heads, self.dim // self.num_heads, grid, **self.attn)
        if bad:
            raise ValueError(
                f"invalid DiTConfig field(s) {bad}: "
                + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
                + " (need input_size % patch_size == 0, dim % 4 == 0, dim % num_heads == 0, class_dropout in [0, 1),"
                + f" conditioning in {list(CONDITIONING_BLOCKS)}; text context and qk_norm only with adaln-zero)"
            )

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DiTConfig:
        return config_from_dict(cls, d)


# DiT's ImageNet setting: 256² images → 32×32×4 SD-VAE latents, 1000 classes, learned sigma (Table 1).
_IMAGENET = dict(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

CONFIGS: dict[str, DiTConfig] = {
    f"DiT-{name}/{p}": DiTConfig(**_IMAGENET, patch_size=p, depth=d, dim=w, num_heads=h)
    for name, (d, w, h) in _SIZES.items()
    for p in (2, 4, 8)
}
# CPU-sized models for 28×28 MNIST (the flagship recipe uses `mnist-p7`: 16 tokens of 7×7 pixels, chosen by
# benchmarks/time_to_quality.py — on 2 CPU cores it reaches far more training images in 3 minutes than patch 4).
CONFIGS.update(
    {
        "mnist-tiny": DiTConfig(patch_size=4, dim=64, depth=2, num_heads=2),
        "mnist-p7": DiTConfig(patch_size=7, dim=128, depth=4, num_heads=4),
        "mnist-s4": DiTConfig(patch_size=4, dim=192, depth=6, num_heads=6),
        "mnist-s2": DiTConfig(patch_size=2, dim=128, depth=6, num_heads=4),
        # on the shipped VAE's latents (f = 4, c = 4: 4×8×8), patch 2 → 16 tokens, the same transformer as mnist-p7
        "mnist-latent-p2": DiTConfig(input_size=8, in_channels=4, patch_size=2, dim=128, depth=4, num_heads=4),
    }
)


def get_config(name: str, **overrides) -> DiTConfig:
    """A named config, optionally with fields replaced (e.g. get_config('mnist-s4', depth=8))."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; choose one of {sorted(CONFIGS)}")
    return replace(CONFIGS[name], **overrides)


class DiT(nn.Module):
    """Diffusion transformer: patch tokens + positions → adaLN-Zero blocks conditioned on c = t_emb + y_emb → patches.

    forward(x, t, y) predicts the rectified-flow velocity (or DDPM noise) for images x (B, C, H, W) at
    times t ∈ [0, 1] (B,) (0 = data, 1 = noise) with class labels y (B,) (y = num_classes is "no label").
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = c = config
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.dim)
        self.t_embedder = TimestepEmbedder(c.dim)
        self.y_embedder = LabelEmbedder(c.num_classes, c.dim, c.class_dropout)
        grid = c.input_size // c.patch_size
        pos = sincos_2d(c.dim, grid)  # (T, D)
        attn_options = None if c.attn is None else {**c.attn, "grid": grid}
        if c.attn is not None and (c.attn.get("rope") or c.attn.get("alibi")):
            pos = torch.zeros_like(pos)  # relative positions live in the attention instead
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)  # (1, T, D)
        if c.conditioning == "adaln-zero":
            self.blocks = nn.ModuleList(
                DiTBlock(c.dim, c.num_heads, c.mlp_ratio, context_dim=c.context_dim, qk_norm=c.qk_norm,
                         attn_options=attn_options)
                for _ in range(c.depth)
            )
        else:  # the conditioning ablation's other variants (see DiTConfig.conditioning)
            block = CONDITIONING_BLOCKS[c.conditioning]
            self.blocks = nn.ModuleList(block(c.dim, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        final = FinalLayer if c.conditioning in ("adaln-zero", "adaln") else PlainFinalLayer
        self.final_layer = final(c.dim, c.patch_size, c.out_channels)
        self.grad_checkpointing = False
        self.init_weights()

    def init_weights(self) -> None:
        """DiT's initialisation: xavier Linear/patch conv, N(0, 0.02) label and time MLP, zero adaLN and output."""
        self.x_embedder.init_weights()
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        self.t_embedder.init_weights()
        for block in self.blocks:
            block.init_weights()
        self.final_layer.init_weights()

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        c = self.config
        want = (c.in_channels, c.input_size, c.input_size)
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must be (B, {want[0]}, {want[1]}, {want[2]}), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
        B = x.shape[0]
        if not isinstance(t, torch.Tensor) or t.shape != (B,):
            raise ValueError(f"t must be a tensor of shape ({B},), got {getattr(t, 'shape', type(t).__name__)}")
        if not isinstance(y, torch.Tensor) or y.shape != (B,):
            raise ValueError(f"y must be a tensor of shape ({B},), got {getattr(y, 'shape', type(y).__name__)}")

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        drop_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.check_inputs(x, t, y)
        tokens = add_positions(self.x_embedder(x), self.pos_embed)  # (B, T, D)
        t_emb, y_emb = self.t_embedder(t), self.y_embedder(y, drop_mask)  # (B, D) each
        c = t_emb + y_emb  # (B, D)
        if self.config.conditioning == "in-context":
            tokens = torch.cat([torch.stack([t_emb, y_emb], dim=1), tokens], dim=1)  # (B, 2 + T, D)
        elif self.config.conditioning == "cross-attention":
            context = torch.stack([t_emb, y_emb], dim=1)  # (B, 2, D): the keys/values of every block
        tokens = self.run_blocks(tokens, c, context, context_mask)
        if self.config.conditioning == "in-context":
            tokens = tokens[:, 2:]  # (B, T, D): drop the two condition tokens before the final layer
        out = self.final_layer(tokens, c)  # (B, T, p·p·C_out)
        return unpatchify(out, self.config.patch_size, self.config.out_channels)  # (B, C_out, H, W)

    def run_blocks(self, tokens: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None,
                   context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T, D) through every block (checkpointed when `grad_checkpointing` is on and training)."""
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            tokens = apply_block(block, ckpt, tokens, c, context, context_mask)  # (B, T, D)
        return tokens


# ---- saving and loading models ---------------------------------------------------------------------------
MODEL_CLASSES: dict[str, tuple[type[nn.Module], type]] = {"DiT": (DiT, DiTConfig)}
# Model classes defined in modules that import this one (minidit.t2i subclasses DiT): (module, class, config
# class), imported on first use by `build_model` so that `load_model` can build them without a circular import.
LAZY_MODEL_CLASSES: dict[str, tuple[str, str, str]] = {
    "MMDiT": ("minidit.mmdit", "MMDiT", "MMDiTConfig"),
    "TextToImage": ("minidit.t2i", "TextToImage", "T2IConfig"),
}


def build_model(name: str, config: dict) -> nn.Module:
    """Instantiate a registered model class (`DiT`, `MMDiT`, `TextToImage`, …) from its config dict."""
    if name not in MODEL_CLASSES and name in LAZY_MODEL_CLASSES:
        import importlib

        module, cls_name, cfg_name = LAZY_MODEL_CLASSES[name]
        mod = importlib.import_module(module)
        MODEL_CLASSES[name] = (getattr(mod, cls_name), getattr(mod, cfg_name))
    if name not in MODEL_CLASSES:
        raise ValueError(f"unknown model class {name!r}; known: {sorted({**MODEL_CLASSES, **LAZY_MODEL_CLASSES})}")
    cls, cfg_cls = MODEL_CLASSES[name]
    return cls(cfg_cls.from_dict(config))


def save_model(path, model: nn.Module, **meta) -> None:
    """Model weights only (kind 'model') + its class and config, for sampling and sharing."""
    from minidit.checkpoint import save_checkpoint

    save_checkpoint(path, model.state_dict(), {"kind": "model", "model": type(model).__name__,
                                               "config": model.config.to_dict(), **meta})


def load_model(path, use_ema: bool = True, device: torch.device | str = "cpu") -> nn.Module:
    """A model from a 'model' checkpoint or a training checkpoint (its EMA weights unless use_ema=False)."""
    from minidit.checkpoint import CheckpointError, load_checkpoint, load_state

    tensors, meta = load_checkpoint(path)
    if meta.get("kind") not in ("model", "train-state"):
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r} checkpoint, not a model or training state")
    model = build_model(meta["model"], meta["config"])
    prefix = "" if meta["kind"] == "model" else ("ema." if use_ema else "model.")
    load_state(model, tensors, prefix, f"{meta['model']} ({path})")
    return model.to(device).eval()
