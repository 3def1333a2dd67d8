"""The flagship method, ``mask``: a learned sparse binary mask over heads, neurons and norm channels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...arch import denoiser_of
from ...config import EraseConfig, MaskConfig
from ...data import build_concept_prompts
from ...training.run import make_accelerator, staging_path
from ..base import Cost, Erasure, Method, register_method
from .artifact import (
    CHANGES,
    CONFIG_NAME,
    WEIGHTS_NAME,
    MaskArtifact,
    check_artifact,
    combine_logits,
    load_mask_artifact,
    write_mask_files,
)
from .fold import FOLD_MODES, fold_into_pipeline
from .model import MaskedModel, fraction_of
from .trainer import MaskTrainer, TrainResult, validate_training_config


class MaskErasure(Erasure):
    """A binary mask: logits per site (a unit is kept where its logit is > 0), applied by hooks.

    ``result`` is the training run's :class:`TrainResult` when this erasure was just fitted.
    """

    method = "mask"
    payload = (WEIGHTS_NAME,)
    foldable = True
    fold_modes = FOLD_MODES
    legacy_record = CONFIG_NAME

    def __init__(
        self,
        logits: dict[str, torch.Tensor],
        record: dict[str, Any],
        path: Path | None = None,
        result: TrainResult | None = None,
    ) -> None:
        super().__init__(record, path)
        self.logits = logits
        self.result = result

    @property
    def artifact(self) -> MaskArtifact:
        return MaskArtifact(self.logits, self.record, self.path)

    @property
    def masked_units(self) -> dict[str, dict[str, int]]:
        """Per unit kind ``{"masked": n, "total": N}`` (the record's, else counted from the logits)."""
        recorded = self.record.get("masked")
        if isinstance(recorded, dict):
            return recorded
        masked = sum(int((v <= 0).sum()) for v in self.logits.values())
        return {"all": {"masked": masked, "total": sum(v.numel() for v in self.logits.values())}}

    @property
    def cost(self) -> Cost:
        """The recorded cost; a mask folder of an earlier version has its stats only."""
        if isinstance(self.record.get("cost"), dict):
            return Cost.from_dict(self.record["cost"])
        stats = self.record.get("stats", {})
        seconds = self.record.get("training", {}).get("seconds", 0.0)
        size = (self.path / WEIGHTS_NAME).stat().st_size if self.path and (self.path / WEIGHTS_NAME).is_file() else 0
        return Cost(CHANGES, stats.get("masked_units", 0), stats.get("total_units", 0), 0, seconds, 0, size)

    @property
    def masked_fraction(self) -> float:
        return fraction_of(self.masked_units)

    def check(self, pipe: Any) -> None:
        arch, denoiser = denoiser_of(pipe)
        check_artifact(self.artifact, arch, denoiser)

    def masked_model(self, pipe: Any) -> MaskedModel:
        """The binary :class:`MaskedModel` of these logits on ``pipe``'s denoiser (hooks not installed)."""
        arch, denoiser = denoiser_of(pipe)
        sites = [s for s in arch.sites(denoiser) if s.key in self.logits]
        masked = MaskedModel(denoiser, sites, logits=self.logits)
        masked.set_mode("binary")
        return masked

    def apply(self, pipe: Any) -> MaskedModel:
        """Install the binary mask's hooks; the returned :class:`MaskedModel`'s ``remove()`` undoes them."""
        self.check(pipe)
        return self.masked_model(pipe).install()

    def fold(self, pipe: Any, mode: str) -> Any:
        """Zero-fold (same shapes) or prune-fold (masked heads and neurons removed) into ``pipe``."""
        self.check_foldable(mode)
        self.check(pipe)
        return fold_into_pipeline(pipe, self.masked_model(pipe).install(), mode)

    @classmethod
    def combine(cls, erasures: list[Erasure]) -> Erasure:
        """Masks combine by logical AND of their keep-masks (the element-wise minimum of the logits)."""
        masks = [e for e in erasures if isinstance(e, MaskErasure)]
        if len(masks) == 1:
            return masks[0]
        logits = combine_logits([m.artifact for m in masks])
        record = dict(masks[0].record)
        record["combined_from"] = [str(m.path) for m in masks]
        record.pop("masked", None)  # the counts of the first mask alone would be wrong
        return cls(logits, record)

    def changed_text(self) -> str:
        return f"{self.masked_fraction:.2%} of masked units off"

    def report(self) -> dict[str, Any]:
        """The mask's own numbers for a report (the demo's metrics)."""
        from ...outputs import tensors_sha256

        return {
            "masked_fraction": self.masked_fraction,
            "masked_units": self.masked_units,
            "mask_sha256": tensors_sha256(self.logits),
        }

    def write_payload(self, folder: Path) -> None:
        # the mask writes its payload and record in one (write_mask_files fills in its stats and cost)
        self.record = write_mask_files(folder, self.logits, self.record)

    def write(self, folder: Path) -> dict[str, Any]:
        self.write_payload(folder)
        return self.record

    @classmethod
    def from_folder(cls, folder: Path, record: dict[str, Any]) -> MaskErasure:
        artifact = load_mask_artifact(folder, cls.method)
        return cls(artifact.logits, artifact.config, folder)

    @classmethod
    def from_legacy(cls, folder: Path) -> MaskErasure:
        return cls.from_folder(folder, {})


@register_method
class MaskMethod(Method):
    """Minimalist concept erasure (docs/design.md, section 1): a sparse binary mask learned through the
    whole sampling trajectory."""

    name = "mask"
    config_class = MaskConfig
    section = "mask"
    erasure_class = MaskErasure
    trains = True
    needs_cfg = False
    changes = CHANGES
    several_concepts = True
    families = ("dit", "flux", "pixart", "sd3", "unet")
    summary = "minimalist concept erasure: a sparse binary mask trained through the sampling trajectory"

    def validate(self, config: EraseConfig) -> None:
        build_concept_prompts(config.concept)  # fail on bad prompts before loading any weights
        validate_training_config(config)

    def fit(
        self,
        pipe: Any,
        config: EraseConfig,
        output: str | Path,
        *,
        accelerator: Any = None,
        resume: bool = False,
        stop_after: int | None = None,
        model_id: str | None = None,
    ) -> MaskErasure:
        output = Path(output)
        if accelerator is None:
            accelerator = make_accelerator(config, staging_path(output))
        trainer = MaskTrainer(pipe, config, output, accelerator, model_id=model_id)
        result = trainer.fit(resume=resume, stop_after=stop_after)
        if result.output != output:  # stopped early: no artefact
            return MaskErasure(result.logits, {}, None, result)
        erasure = MaskErasure.load(output)
        assert isinstance(erasure, MaskErasure)
        # the trained tensors themselves (the artefact holds the same values), and the run's result
        erasure.logits, erasure.result = result.logits, result
        return erasure


__all__ = ["MaskErasure", "MaskMethod"]
