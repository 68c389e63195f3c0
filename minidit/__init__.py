"""minidit: a compact PyTorch package for learning diffusion transformers (DiT, SD3's MMDiT, attention)."""

from minidit.models import CONFIGS, DiT, DiTConfig, get_config

__version__ = "0.2.0"
__all__ = ["CONFIGS", "DiT", "DiTConfig", "get_config", "__version__"]
