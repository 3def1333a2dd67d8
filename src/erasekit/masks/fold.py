"""Bake a binary mask into the weights and save a stock diffusers pipeline.

* ``zero``: multiply the masked rows/columns by zero -- same shapes, any diffusers loads it.
* ``prune``: physically remove masked heads and neurons -- fewer parameters; the pruned denoiser
  class ships inside the folder as a diffusers custom component, loaded with
  ``DiffusionPipeline.from_pretrained(path, trust_remote_code=True)``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..arch import denoiser_of, zero_fold_site
from ..outputs import atomic_directory, commit_directory
from .model import MaskedModel

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


def save_folded_pipeline(pipe: Any, output: str | Path, mode: str, provenance: dict[str, Any] | None = None) -> Path:
    """``save_pretrained`` the folded pipeline atomically; for ``prune`` also ship the component code."""
    arch, denoiser = denoiser_of(pipe)
    target = Path(output)
    if target.exists():
        raise FileExistsError(f"output {str(target)!r} already exists; choose another --output or remove it")
    tmp = atomic_directory(target)
    try:
        arch.before_save(pipe)
        pipe.save_pretrained(tmp, safe_serialization=True)
        if mode == "prune":
            component = arch.pruned_component_source()
            shutil.copy(component, tmp / arch.denoiser_attr / component.name)
            index_file = tmp / "model_index.json"
            index = json.loads(index_file.read_text())
            index[arch.denoiser_attr] = [component.stem, type(denoiser).__name__]
            index_file.write_text(json.dumps(index, indent=2))
        if provenance is not None:
            (tmp / "erasekit_fold.json").write_text(json.dumps({"mode": mode, **provenance}, indent=2, default=str))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_directory(tmp, target)
    return target
