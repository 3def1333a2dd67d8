"""FlowEdit (Kulikov et al., 2024): inference-time editing along a rectified flow, concept prompt -> anchor."""

from erasekit.methods.flowedit.kernels import VelocityField, flowedit
from erasekit.methods.flowedit.method import FlowEditErasure, FlowEditMethod

__all__ = ["FlowEditErasure", "FlowEditMethod", "VelocityField", "flowedit"]
