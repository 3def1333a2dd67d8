"""Bake a binary mask into the weights and save a stock diffusers pipeline.

* ``zero``: multiply the masked rows/columns by zero -- same shapes, any diffusers loads it.
* ``prune``: physically remove masked heads and neurons -- fewer parameters; the pruned denoiser
  class ships inside the folder as a diffusers custom component, loaded with
  ``DiffusionPipeline.from_pretrained(path, trust_remote_code=True)``.
"""

from __future__ import annotations

from typing import Any

from ...arch import denoiser_of, zero_fold_site
from ..base import save_folded_pipeline
from .model import MaskedModel

__all__ = ["FOLD_MODES", "fold_into_pipeline", "save_folded_pipeline"]

FOLD_MODES = ("zero", "prune")


def fold_into_pipeline(pipe: Any, masked: MaskedModel, mode: str) -> Any:
    """Fold ``masked`` (binary) into ``pipe`` in place and remove its hooks; returns the pipeline.

    With ``mode="prune"`` the pipeline's denoiser is replaced by the smaller pruned one.
    """
    if mode not in FOLD_MODES:
        raise ValueError(f"fold mode must be one of {', '.join(FOLD_MODES)}, got {mode!r}")
    arch, denoiser = denoiser_of(pipe)
    keep = masked.keep_masks()
    masked.remove()
    for site in masked.sites:
        zero_fold_site(denoiser, site, keep[site.key])
    if mode == "prune":
        pruned = arch.prune(denoiser, keep).to(denoiser.device)
        pipe.register_modules(**{arch.denoiser_attr: pruned})
    return pipe
