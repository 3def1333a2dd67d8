"""erasekit: erase concepts from text-to-image diffusion and flow models."""

__version__ = "0.1.0"
