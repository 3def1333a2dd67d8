"""FlowEdit (Kulikov et al., 2024): inference-time editing along a rectified flow, concept prompt -> anchor."""

from erasekit.methods.flowedit.kernels import VelocityField, flowedit

__all__ = ["VelocityField", "flowedit"]
