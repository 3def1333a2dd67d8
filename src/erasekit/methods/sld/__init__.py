"""Safe Latent Diffusion (SLD, Schramowski et al., CVPR 2023): inference-time safety guidance, needs CFG."""

from erasekit.methods.sld.kernels import SLD_PRESETS, SafeLatentGuidance, SLDSettings, sld_preset, sld_step
from erasekit.methods.sld.method import SLDErasure, SLDGuidance, SLDMethod

__all__ = [
    "SLD_PRESETS",
    "SLDErasure",
    "SLDGuidance",
    "SLDMethod",
    "SLDSettings",
    "SafeLatentGuidance",
    "sld_preset",
    "sld_step",
]
