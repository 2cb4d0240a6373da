"""glowflow: Glow (Kingma & Dhariwal, 2018) in PyTorch."""
from .model import Glow, GlowConfig, GlowOutput
from .numerics import bits_per_dim, dequantize, quantize

__version__ = "0.1.0"
__all__ = ["Glow", "GlowConfig", "GlowOutput", "bits_per_dim", "dequantize", "quantize", "__version__"]
