"""Text-to-image at toy scale: a jointly trained text encoder + a cross-attention DiT (PixArt-α style) or an MMDiT.

How the pieces reuse the package:
- a caption is an id into the closed caption set of its dataset (`minidit.text.caption_set`); id N is the empty
  (null) caption. So `TextToImage.forward(x, t, y, drop_mask)` has the signature of `DiT.forward`, and the package's
  `Trainer` (caption dropout = its label dropout), `flow.sample` and `flow.guided` (CFG) work unchanged;
- the model looks the tokens of caption y up in a table, encodes them with `TextEncoder`, and conditions the
  backbone on the token states (cross-attention or joint attention) and on the pooled vector (adaLN);
- evaluation lives next door: `minidit.faithfulness` scores generated images against the captions' ground truth
  with a deterministic checker; `minidit.attention_maps` records and measures image→word attention.

Train and ship a model (the shipped ones; `shapes-dit` likewise; ~20 CPU-minutes each):
    python -m minidit.t2i train --config shapes-mmdit --steps 1500 --batch-size 64 --lr 1e-3 --seed 0
        --eval-at 250,500,750,1000,1500 --threads 1 --out minidit/weights/shapes_mmdit.safetensors  (one line)
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from minidit.checkpoint import config_from_dict
from minidit.data import COLOURS, POSITIONS, SHAPES, SIZES, CaptionedShapes, ShapeSpec, caption_for
from minidit.embed import init_mlp
from minidit.flow import sample
from minidit.mmdit import MMDiT, MMDiTConfig, check_text_inputs
from minidit.models import DiT, DiTConfig
from minidit.runinfo import command_line
from minidit.text import TextEncoder, Tokenizer, caption_set
from minidit.tokens import add_positions, unpatchify

BACKBONES = ("dit", "mmdit")


@dataclass(frozen=True)
class T2IConfig:
    """A text-to-image model: the text encoder, the backbone and its size (saved as JSON with every checkpoint)."""

    backbone: str = "mmdit"  # "dit" = DiT + cross-attention to text (PixArt-α style), "mmdit" = SD3's MMDiT
    caption_set: str = "shapes"  # "shapes" (captioned shapes) or "mnist" ("a handwritten seven")
    input_size: int = 32
    in_channels: int = 3
    patch_size: int = 4
    dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    text_dim: int = 64
    text_depth: int = 2
    text_heads: int = 4
    max_len: int = 16
    class_dropout: float = 0.1  # caption dropout for CFG (the name the Trainer reads to draw its drop mask)

    def __post_init__(self):
        checks = {
            "backbone": self.backbone in BACKBONES,
            "caption_set": self.caption_set in ("shapes", "mnist"),
            "text_dim": self.text_dim >= 1 and self.text_dim % self.text_heads == 0,
            "class_dropout": 0 <= self.class_dropout < 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            got = ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
            raise ValueError(f"invalid T2IConfig field(s) {bad}: {got} (backbone in {BACKBONES}, caption_set "
                             "'shapes' or 'mnist', text_dim % text_heads == 0)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> T2IConfig:
        return config_from_dict(cls, d)


T2I_CONFIGS: dict[str, T2IConfig] = {
    "shapes-dit": T2IConfig(backbone="dit"),
    "shapes-mmdit": T2IConfig(backbone="mmdit"),
    "mnist-dit": T2IConfig(backbone="dit", caption_set="mnist", input_size=28, in_channels=1, patch_size=4),
    "mnist-mmdit": T2IConfig(backbone="mmdit", caption_set="mnist", input_size=28, in_channels=1, patch_size=4),
}


def get_t2i_config(name: str, **overrides) -> T2IConfig:
    """A named text-to-image config, optionally with fields replaced."""
    if name not in T2I_CONFIGS:
        raise ValueError(f"unknown text-to-image config {name!r}; choose one of {sorted(T2I_CONFIGS)}")
    return replace(T2I_CONFIGS[name], **overrides)


class CrossAttnDiT(DiT):
    """DiT whose blocks cross-attend to text tokens, with c = t_emb + MLP(pooled text) (PixArt-α-style conditioning).

    DiT's label table is kept with a single class (index 0, always): it acts as a learned bias on c.
    """

    def __init__(self, config: DiTConfig, pooled_dim: int):
        if config.context_dim is None or config.num_classes != 1:
            raise ValueError(f"CrossAttnDiT needs context_dim set and num_classes = 1, got {config.context_dim}, "
                             f"{config.num_classes}")
        super().__init__(config)
        self.pooled_embedder = nn.Sequential(nn.Linear(pooled_dim, config.dim), nn.SiLU(),
                                             nn.Linear(config.dim, config.dim))
        init_mlp(self.pooled_embedder)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        y = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        self.check_inputs(x, t, y)
        check_text_inputs(context, pooled, context_mask, x.shape[0], self.config.context_dim,
                          self.pooled_embedder[0].in_features)
        tokens = add_positions(self.x_embedder(x), self.pos_embed)  # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y) + self.pooled_embedder(pooled)  # (B, D)
        tokens = self.run_blocks(tokens, c, context, context_mask)  # (B, T, D)
        out = self.final_layer(tokens, c)  # (B, T, p·p·C)
        return unpatchify(out, self.config.patch_size, self.config.out_channels)  # (B, C, H, W)


class TextToImage(nn.Module):
    """Text encoder + backbone: forward(x, t, y, drop_mask) with y (B,) caption ids, id `null_label` = "" (no text)."""

    def __init__(self, config: T2IConfig):
        super().__init__()
        self.config = c = config
        self.tokenizer = Tokenizer(max_len=c.max_len)
        self.captions = caption_set(c.caption_set)
        self.caption_index = {cap: i for i, cap in enumerate(self.captions)}
        ids, mask = self.tokenizer.encode([*self.captions, ""])  # (N+1, L): row N is the null caption
        self.register_buffer("caption_tokens", ids, persistent=False)
        self.register_buffer("caption_mask", mask, persistent=False)
        self.text = TextEncoder(self.tokenizer.vocab_size, c.text_dim, c.text_depth, c.text_heads, c.max_len)
        if c.backbone == "dit":
            dcfg = DiTConfig(input_size=c.input_size, in_channels=c.in_channels, patch_size=c.patch_size, dim=c.dim,
                             depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, num_classes=1,
                             class_dropout=0.0, context_dim=c.text_dim, qk_norm=c.qk_norm)
            self.backbone = CrossAttnDiT(dcfg, pooled_dim=c.text_dim)
        else:
            mcfg = MMDiTConfig(input_size=c.input_size, in_channels=c.in_channels, patch_size=c.patch_size, dim=c.dim,
                               depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, context_dim=c.text_dim,
                               pooled_dim=c.text_dim, qk_norm=c.qk_norm)
            self.backbone = MMDiT(mcfg)

    @property
    def null_label(self) -> int:
        return len(self.captions)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def caption_ids(self, captions: list[str]) -> torch.Tensor:
        """Captions → ids (B,); "" is the null caption. Unknown captions raise with an example of a valid one."""
        if isinstance(captions, str):
            raise ValueError("caption_ids expects a list of captions, got a single str")
        missing = [cap for cap in captions if cap and cap not in self.caption_index]
        if missing:
            raise ValueError(f"caption(s) not in the {self.config.caption_set!r} caption set: {missing[:3]}; "
                             f"e.g. {self.captions[-1]!r}")
        ids = [self.caption_index[cap] if cap else self.null_label for cap in captions]
        return torch.tensor(ids, dtype=torch.long, device=self.caption_tokens.device)

    def encode_text(
        self, y: torch.Tensor, drop_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Caption ids (B,) → (token states (B, L, text_dim), pooled (B, text_dim), mask (B, L)); dropped → null."""
        if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"y must be an integer tensor (B,) of caption ids, got {getattr(y, 'dtype', type(y))} "
                             f"{tuple(getattr(y, 'shape', ()))}")
        if y.numel() and not torch.compiler.is_compiling() and (int(y.min()) < 0 or int(y.max()) > self.null_label):
            raise ValueError(f"caption ids must be in [0, {self.null_label}] ({self.null_label} = null caption), "
                             f"got values in [{int(y.min())}, {int(y.max())}]")
        if self.training and drop_mask is None and self.config.class_dropout > 0:
            drop_mask = torch.rand(y.shape[0], device=y.device) < self.config.class_dropout
        if drop_mask is not None:
            y = torch.where(drop_mask, torch.full_like(y, self.null_label), y)
        ids, mask = self.caption_tokens[y], self.caption_mask[y]  # (B, L) each
        tokens, pooled = self.text(ids, mask)
        return tokens, pooled, mask

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        tokens, pooled, mask = self.encode_text(y, drop_mask)
        return self.backbone(x, t, tokens, pooled, mask)


# ---- data --------------------------------------------------------------------------------------------------------
def heldout_captions(fraction: float = 0.1, seed: int = 0) -> set[str]:
    """A fixed random subset of the two-object captions never shown in training (compositional generalisation)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    two = [cap for cap in caption_set("shapes") if " and " in cap]
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(two), size=int(round(fraction * len(two))), replace=False)
    return {two[i] for i in pick}


def shapes_tensors(
    n: int = 6000, seed: int = 0, exclude: set[str] | None = None, size: int = 32
) -> tuple[torch.Tensor, torch.Tensor, list[list[ShapeSpec]]]:
    """Captioned shapes as tensors: images (N, 3, size, size), caption ids (N,), objects; excluded captions skipped."""
    ds = CaptionedShapes(n=n, seed=seed, size=size)
    index = {cap: i for i, cap in enumerate(caption_set("shapes"))}
    images, ids, objects = [], [], []
    for i in range(n):
        item = ds[i]
        if exclude and item["caption"] in exclude:
            continue
        images.append(item["image"])
        ids.append(index[item["caption"]])
        objects.append(item["objects"])
    return torch.stack(images), torch.tensor(ids), objects


def objects_of(caption: str) -> list[ShapeSpec]:
    """Parse a shapes caption back into its objects (the inverse of `minidit.data.caption_for`)."""
    objs = []
    for part in caption.split(" and "):
        w = part.split()  # a SIZE COLOUR SHAPE on the POS | a SIZE COLOUR SHAPE in the center
        if len(w) != 7 or w[0] != "a" or w[1] not in SIZES or w[2] not in COLOURS or w[3] not in SHAPES \
                or w[6] not in POSITIONS:
            raise ValueError(f"not a captioned-shapes caption: {caption!r}")
        objs.append(ShapeSpec(shape=w[3], colour=w[2], size=w[1], position=w[6]))
    if caption_for(objs) != caption:
        raise ValueError(f"not a captioned-shapes caption: {caption!r}")
    return objs


# ---- sampling ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(
    model: TextToImage,
    captions: list[str],
    steps: int = 20,
    cfg_scale: float = 1.0,
    seed: int = 0,
    sampler: str = "euler",
) -> torch.Tensor:
    """Images (B, C, H, W) in [−1, 1] for captions, rectified-flow sampling with classifier-free guidance."""
    y = model.caption_ids(captions)
    g = torch.Generator().manual_seed(seed)
    return sample(model, y, steps=steps, cfg_scale=cfg_scale, sampler=sampler, generator=g).clamp(-1, 1).cpu()


# ---- training (the package's Trainer) -------------------------------------------------------------------------------
def train(
    config: T2IConfig,
    steps: int = 3000,
    batch_size: int = 64,
    lr: float = 1e-3,
    n_images: int = 6000,
    seed: int = 0,
    holdout: float = 0.1,
    progress: bool = True,
    time_budget: float | None = None,
    device: torch.device | str = "cpu",
    callback=None,
):
    """Train a text-to-image model on captioned shapes (or MNIST captions) with `minidit.train.Trainer`.

    Returns the Trainer (its `.ema` is the model to sample from); `callback(trainer)` runs after every step.
    Captions in `heldout_captions(holdout)` are never trained on, so faithfulness can be measured on seen and
    unseen combinations.
    """
    from minidit.data import mnist_tensors
    from minidit.train import TrainConfig, Trainer

    torch.manual_seed(seed)
    if config.caption_set == "shapes":
        images, y, _ = shapes_tensors(n_images, seed=seed, exclude=heldout_captions(holdout) if holdout else None,
                                      size=config.input_size)
    else:
        images, y = mnist_tensors("train")  # label i ↔ caption i ("a handwritten <i>")
    tcfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(100, steps // 10),
                       ema_decay=0.999, seed=seed, log_every=10, time_budget=time_budget,
                       extra={"n_images": int(images.shape[0]), "holdout": holdout})
    trainer = Trainer(TextToImage(config), images, y, tcfg, device=device)
    trainer.run(progress=progress, callback=callback)
    return trainer


def save_shipped(path: str | Path, trainer, command: str, **meta) -> Path:
    """The EMA weights in fp16 (small enough to ship) + config, training settings, history and the command."""
    from minidit.models import save_model

    model = copy.deepcopy(trainer.ema).half()
    save_model(path, model, train=asdict(trainer.cfg), step=trainer.step, train_seconds=trainer.train_seconds,
               history=trainer.history, num_params=model.num_params(), command=command, **meta)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minidit.t2i", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train a text-to-image model and save its EMA weights (fp16)")
    tr.add_argument("--config", default="shapes-mmdit", choices=sorted(T2I_CONFIGS))
    tr.add_argument("--out", required=True, help="output .safetensors path")
    tr.add_argument("--steps", type=int, default=3000)
    tr.add_argument("--batch-size", type=int, default=64)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--n-images", type=int, default=6000)
    tr.add_argument("--holdout", type=float, default=0.1)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--threads", type=int, default=2)
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--eval-at", default="", help="steps at which to score the EMA's caption faithfulness (e.g. "
                    "500,1000); stored in the checkpoint's JSON as the learning curve")
    args = p.parse_args(argv)
    from minidit.faithfulness import evaluation_captions, faithfulness_report  # imports this module

    torch.set_num_threads(args.threads)
    cfg = get_t2i_config(args.config)
    t0 = time.perf_counter()
    eval_at = {int(x) for x in args.eval_at.split(",") if x}
    captions = evaluation_captions() if eval_at else {}
    curve: dict[int, dict] = {}

    def evaluate(tr) -> None:  # runs outside the timed training step
        if tr.step in eval_at:
            curve[tr.step] = {"train_seconds": round(tr.train_seconds, 1),
                              **faithfulness_report(tr.ema, captions, scales=(1.0, 3.0))}
            print(f"step {tr.step}: {curve[tr.step]}", flush=True)

    trainer = train(cfg, args.steps, args.batch_size, args.lr, args.n_images, args.seed, args.holdout,
                    progress=False, device=args.device, callback=evaluate if eval_at else None)
    command = command_line("python -m minidit.t2i", argv)
    path = save_shipped(args.out, trainer, command, config_name=args.config, torch=torch.__version__,
                        threads=torch.get_num_threads(), wall_seconds=round(time.perf_counter() - t0, 1),
                        curve=curve, curve_captions={k: len(v) for k, v in captions.items()})
    print(f"saved {path} ({trainer.step} steps, {trainer.train_seconds:.0f} s, final loss "
          f"{trainer.history[-1]['loss']:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
