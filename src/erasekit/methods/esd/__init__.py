"""Erased Stable Diffusion (ESD, Gandikota et al., ICCV 2023): negative-guidance fine-tuning."""

from erasekit.methods.esd.kernels import (
    ESD_DEFAULT_ETA,
    ESD_DEFAULT_ITERATIONS,
    ESD_DEFAULT_LR,
    ESD_DEFAULT_START_GUIDANCE,
    ESD_VARIANTS,
    Predictor,
    esd_loss,
    esd_parameters,
    esd_target,
    esd_target_from_model,
    module_name_predicate,
    select_parameters,
)
from erasekit.methods.esd.method import EsdErasure, EsdMethod

__all__ = [
    "EsdErasure",
    "EsdMethod",
    "ESD_DEFAULT_ETA",
    "ESD_DEFAULT_ITERATIONS",
    "ESD_DEFAULT_LR",
    "ESD_DEFAULT_START_GUIDANCE",
    "ESD_VARIANTS",
    "Predictor",
    "esd_loss",
    "esd_parameters",
    "esd_target",
    "esd_target_from_model",
    "module_name_predicate",
    "select_parameters",
]
