"""minidit: a compact PyTorch package for learning diffusion transformers (DiT, SD3's MMDiT, attention)."""

from minidit.models import CONFIGS, DiT, DiTConfig, get_config, load_model, save_model

__version__ = "0.1.0"
__all__ = ["CONFIGS", "DiT", "DiTConfig", "get_config", "load_model", "save_model", "__version__"]
