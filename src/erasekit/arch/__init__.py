"""Architecture files: one per model family, registered by the diffusers class of the denoiser."""

from .base import (
    Architecture,
    MaskSite,
    Trajectory,
    architecture_by_class_name,
    architecture_for,
    count_units,
    select_sites,
    supported_classes,
    zero_fold_site,
)
from .flux import FLUX

__all__ = [
    "Architecture",
    "FLUX",
    "MaskSite",
    "Trajectory",
    "architecture_by_class_name",
    "architecture_for",
    "count_units",
    "select_sites",
    "supported_classes",
    "zero_fold_site",
]
