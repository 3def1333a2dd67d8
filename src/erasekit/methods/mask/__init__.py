"""The ``mask`` method: parameterisations, hooks (:class:`MaskedModel`), the trainer, artefacts and folding."""

from pathlib import Path
from typing import Any

from .artifact import (
    MaskArtifact,
    base_model_record,
    check_artifact,
    combine_logits,
    load_mask_artifact,
    save_mask_artifact,
)
from .method import MaskErasure, MaskMethod
from .model import MaskedModel
from .parameterization import MaskSettings, binary_mask, closed_probability, mask_values


def apply_masks(pipe: Any, mask_dirs: list[str | Path]) -> MaskedModel:
    """Load mask artefacts, check them against the pipeline, combine them (AND) and install hooks.

    Returns the installed :class:`MaskedModel` in binary mode; call ``.remove()`` to undo. (Any
    erasure, masks included: :func:`erasekit.methods.apply_erasures`.)
    """
    erasures = [MaskErasure.load(d) for d in mask_dirs]
    for erasure in erasures:
        erasure.check(pipe)
    combined = MaskErasure.combine(list(erasures))
    assert isinstance(combined, MaskErasure)
    return combined.apply(pipe)


__all__ = [
    "MaskArtifact",
    "MaskErasure",
    "MaskMethod",
    "MaskSettings",
    "MaskedModel",
    "apply_masks",
    "base_model_record",
    "binary_mask",
    "check_artifact",
    "closed_probability",
    "combine_logits",
    "load_mask_artifact",
    "mask_values",
    "save_mask_artifact",
]
