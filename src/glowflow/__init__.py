"""glowflow: Glow (Kingma & Dhariwal, 2018) in PyTorch."""
from .config import GlowConfig, TrainConfig
from .model import Glow, GlowOutput
from .numerics import bits_per_dim, dequantize, quantize

__version__ = "0.1.0"
__all__ = ["Glow", "GlowConfig", "GlowOutput", "TrainConfig", "bits_per_dim", "dequantize", "quantize",
           "__version__"]
