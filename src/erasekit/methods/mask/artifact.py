"""The mask artefact: an erasure folder (``erasure.json``) with ``masks.safetensors`` as its payload.

``masks.safetensors`` holds one float32 logit tensor per masked site, keyed ``kind/module.path``;
a unit is kept where its logit is positive. ``erasure.json`` records how the mask was made and for
which denoiser (class and a hash of its config), so that loading it onto another model fails with a
message naming the mismatch. Mask folders of earlier erasekit versions (``mask_config.json``, format
``erasekit-mask``) still load.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ...arch.base import Architecture, MaskSite
from ...errors import MaskFileError, MaskMismatchError
from ...outputs import atomic_directory, commit_directory
from ..base import (
    FORMAT_VERSION,
    RECORD_NAME,
    base_model_record,
    check_format_version,
    check_model,
    denoiser_config_hash,
    generation_defaults,
    read_json_object,
    read_record,
    write_record,
)

#: The record file of mask folders written before the erasure format (read, never written).
CONFIG_NAME = "mask_config.json"
WEIGHTS_NAME = "masks.safetensors"
#: The ``format`` of those older records.
LEGACY_FORMAT = "erasekit-mask"
CHANGES = "mask over heads/neurons/channels"

__all__ = [
    "CHANGES",
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "RECORD_NAME",
    "WEIGHTS_NAME",
    "MaskArtifact",
    "base_model_record",
    "check_artifact",
    "combine_logits",
    "denoiser_config_hash",
    "load_mask_artifact",
    "save_mask_artifact",
    "write_mask_files",
]


@dataclass
class MaskArtifact:
    """Logits and metadata of one saved mask."""

    logits: dict[str, torch.Tensor]
    config: dict[str, Any]
    path: Path | None = None

    @property
    def keep(self) -> dict[str, torch.Tensor]:
        return {k: v > 0 for k, v in self.logits.items()}

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """Sampling settings to generate with: the training trajectory's, with ``sampling.generation_steps``
        as the steps where it was set."""
        return generation_defaults(self.config.get("settings", {}))


def save_mask_artifact(
    path: str | Path, logits: dict[str, torch.Tensor], config: dict[str, Any], overwrite: bool = False
) -> Path:
    """Write a mask artefact atomically (temporary folder, then rename)."""
    target = Path(path)
    tmp = atomic_directory(target)
    try:
        write_mask_files(tmp, logits, config)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_directory(tmp, target, overwrite=overwrite)
    return target


def write_mask_files(folder: Path, logits: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, Any]:
    """Write ``masks.safetensors`` and ``erasure.json`` into an existing folder; returns the record.

    ``config`` is the method-specific part of the record (base model, concept, settings, training, ...);
    the mask's stats, concepts, generation defaults and cost are filled in where it leaves them out.
    """
    tensors = {k: v.detach().to(torch.float32).cpu().contiguous() for k, v in logits.items()}
    bad = _non_finite(tensors)
    if bad:
        # a NaN logit is neither open nor closed; writing it would only move the failure to whoever loads the mask
        raise MaskFileError(
            f"refusing to write a mask with non-finite logits ({bad}); lower the mask learning rates (mask.*.lr)"
        )
    masked = sum(int((v <= 0).sum()) for v in tensors.values())
    total = sum(v.numel() for v in tensors.values())
    record = {"method": "mask", **config}
    record.setdefault(
        "stats", {"masked_units": masked, "total_units": total, "masked_fraction": masked / total if total else 0.0}
    )
    if "concept" in record:
        record.setdefault("concepts", [record["concept"]] if record["concept"] else [])
    record.setdefault("generation", generation_defaults(record.get("settings", {})))
    training = record.get("training")
    seconds = float(training.get("seconds", 0.0)) if isinstance(training, dict) else 0.0
    cost = {"changes": CHANGES, "units_changed": masked, "units_total": total, "parameters_changed": 0}
    record["cost"] = {**cost, "seconds": seconds, **dict(record.get("cost") or {})}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": LEGACY_FORMAT})
    return write_record(folder, record, [WEIGHTS_NAME])


def load_mask_artifact(path: str | Path, method: str = "mask") -> MaskArtifact:
    """Read a mask artefact (an erasure folder, or a ``mask_config.json`` folder of an earlier version).

    ``method``: the method the erasure record must name (a method whose result is a mask, such as
    ``concept-prune``, writes the same artefact under its own name).

    Raises:
        MaskFileError: a missing, corrupt or newer-format file.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise MaskFileError(f"mask folder {str(folder)!r} does not exist; pass the --output folder of `erasekit erase`")
    if (folder / RECORD_NAME).is_file():
        config = read_record(folder)
        if config.get("method") != method:
            raise MaskFileError(f"{str(folder)!r} holds a {config.get('method')!r} erasure, not a {method} one")
    else:
        config = _read_legacy_config(folder)
    weights_file = folder / WEIGHTS_NAME
    if not weights_file.is_file():
        raise MaskFileError(f"mask folder {str(folder)!r} has no {WEIGHTS_NAME}; it is not an erasekit mask artefact")
    try:
        logits = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MaskFileError(f"{weights_file} is corrupt or not a safetensors file: {first}") from None
    bad = _non_finite(logits)
    if bad:
        raise MaskFileError(f"{weights_file} holds non-finite logits ({bad}); the mask is corrupt: train it again")
    return MaskArtifact(logits={k: v.to(torch.float32) for k, v in logits.items()}, config=config, path=folder)


def _read_legacy_config(folder: Path) -> dict[str, Any]:
    """The ``mask_config.json`` of a mask folder written before the erasure format."""
    config_file = folder / CONFIG_NAME
    for file in (config_file, folder / WEIGHTS_NAME):
        if not file.is_file():
            raise MaskFileError(f"mask folder {str(folder)!r} has no {file.name}; it is not an erasekit mask artefact")
    config = read_json_object(config_file, "mask config")
    if config.get("format") != LEGACY_FORMAT:
        raise MaskFileError(f"{config_file} is not an erasekit mask config (format {config.get('format')!r})")
    check_format_version(config, config_file)
    return config


def _non_finite(logits: dict[str, torch.Tensor]) -> str:
    """``""`` when every logit is finite, else how many are not and the first key holding one."""
    bad = {k: int((~torch.isfinite(v.float())).sum()) for k, v in logits.items()}
    bad = {k: n for k, n in bad.items() if n}
    return f"{sum(bad.values())} in {len(bad)} tensors, first {next(iter(bad))!r}" if bad else ""


def check_artifact(artifact: MaskArtifact, arch: Architecture, denoiser: nn.Module) -> list[MaskSite]:
    """Check an artefact against a denoiser; return the sites its keys name (in model order).

    Raises:
        MaskMismatchError: naming the first problem (another model class or config, an unknown key, a shape).
    """
    where = f"mask {str(artifact.path)!r}" if artifact.path else "mask"
    check_model(artifact.config, denoiser, where)
    base = artifact.config.get("base_model", {})
    sites = {s.key: s for s in arch.sites(denoiser)}
    for key, value in artifact.logits.items():
        site = sites.get(key)
        if site is None:
            raise MaskMismatchError(
                f"{where} does not fit this model: key {key!r} is not a mask site here "
                f"(model {base.get('id')!r} differs?)"
            )
        if tuple(value.shape) != (site.num_units,):
            raise MaskMismatchError(
                f"{where} does not fit this model: {key!r} has {tuple(value.shape)} units, "
                f"the model has ({site.num_units},)"
            )
    return [s for k, s in sites.items() if k in artifact.logits]


def combine_logits(artifacts: list[MaskArtifact]) -> dict[str, torch.Tensor]:
    """Combine masks by logical AND of their keep-masks: the element-wise minimum of the logits."""
    combined: dict[str, torch.Tensor] = {}
    for artifact in artifacts:
        for key, value in artifact.logits.items():
            combined[key] = torch.minimum(combined[key], value) if key in combined else value.clone()
    return combined
