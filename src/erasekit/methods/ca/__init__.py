"""Concept Ablation (CA, Kumari et al., ICCV 2023): match the anchor prompt's prediction, stop-gradient."""

from erasekit.methods.ca.kernels import (
    CA_DEFAULT_LR,
    CA_DEFAULT_STEPS,
    CA_PARAMETER_GROUPS,
    ca_loss,
    ca_loss_from_model,
    ca_parameters,
    masked_mse,
)
from erasekit.methods.ca.method import CaErasure, CaMethod

__all__ = [
    "CaErasure",
    "CaMethod",
    "CA_DEFAULT_LR",
    "CA_DEFAULT_STEPS",
    "CA_PARAMETER_GROUPS",
    "ca_loss",
    "ca_loss_from_model",
    "ca_parameters",
    "masked_mse",
]
