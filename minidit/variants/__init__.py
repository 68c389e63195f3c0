"""Experiments beside the teaching path: what lessons 08 and 12 and the benchmarks study, never what DiT needs.

- `conditioning`: the conditioning ablation of DiT Table 4 — in-context tokens, cross-attention to the condition,
  plain adaLN, adaLN with gates but ordinary init — as blocks and one model that swaps them in.
- `attention`: attention variants SD3 and DiT do not use — grouped-query attention, ALiBi-2D, RoPE-2D, windowed
  attention with pooled global tokens — and a DiT built with them.
- `speed`: CPU speed paths (unfused attention for short sequences), which recipes and benchmarks opt into.
- `hires`: high resolution (lesson 13) — single stage, a cascade's super-resolution stage, an hourglass with
  cross-resolution attention.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minidit.checkpoint import load_model
from minidit.variants.attention import VariantConfig, VariantDiT
from minidit.variants.conditioning import AblationConfig, AblationDiT
from minidit.variants.hires import HiresConfig, HiresT2I, SuperRes

VARIANT_CLASSES = {"AblationDiT": (AblationDiT, AblationConfig), "VariantDiT": (VariantDiT, VariantConfig),
                   "HiresT2I": (HiresT2I, HiresConfig), "SuperRes": (SuperRes, HiresConfig)}


def load_variant(path: str | Path, use_ema: bool = True, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A saved variant model (or any of the package's models), as `minidit.checkpoint.load_model` loads them."""
    return load_model(path, use_ema, device, classes=VARIANT_CLASSES)
