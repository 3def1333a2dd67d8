"""Mask parameterisations, hooks (:class:`MaskedModel`), artefacts and folding."""

from .artifact import (
    MaskArtifact,
    base_model_record,
    check_artifact,
    combine_logits,
    load_mask_artifact,
    save_mask_artifact,
)
from .model import MaskedModel
from .parameterization import MaskSettings, binary_mask, closed_probability, mask_values

__all__ = [
    "MaskArtifact",
    "MaskSettings",
    "MaskedModel",
    "base_model_record",
    "binary_mask",
    "check_artifact",
    "closed_probability",
    "combine_logits",
    "load_mask_artifact",
    "mask_values",
    "save_mask_artifact",
]
