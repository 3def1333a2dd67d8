"""Architecture files: one per model family, registered by the diffusers class of the denoiser."""

from .base import (
    Architecture,
    MaskSite,
    NoiseSchedule,
    Trajectory,
    architecture_by_class_name,
    architecture_for,
    count_units,
    denoiser_of,
    select_sites,
    supported_classes,
    zero_fold_site,
)
from .capture import capture_layer_inputs
from .dit import DIT
from .flux import FLUX
from .guidance import ClassifierFreeGuidance, Conditional, Guidance
from .pixart import PIXART
from .samplers import run_trajectory
from .sd3 import SD3
from .unet import UNET

__all__ = [
    "Architecture",
    "ClassifierFreeGuidance",
    "Conditional",
    "DIT",
    "FLUX",
    "Guidance",
    "PIXART",
    "SD3",
    "UNET",
    "MaskSite",
    "NoiseSchedule",
    "Trajectory",
    "architecture_by_class_name",
    "architecture_for",
    "capture_layer_inputs",
    "count_units",
    "denoiser_of",
    "run_trajectory",
    "select_sites",
    "supported_classes",
    "zero_fold_site",
]
