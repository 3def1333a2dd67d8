"""The mask artefact: a folder with ``mask_config.json`` and ``masks.safetensors``.

``masks.safetensors`` holds one float32 logit tensor per masked site, keyed ``kind/module.path``;
a unit is kept where its logit is positive. ``mask_config.json`` records how the mask was made
and for which denoiser (class and a hash of its config), so that loading it onto another model
fails with a message naming the mismatch.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..arch.base import Architecture, MaskSite
from ..errors import MaskFileError, MaskMismatchError
from ..outputs import atomic_directory, commit_directory, json_sha256

CONFIG_NAME = "mask_config.json"
WEIGHTS_NAME = "masks.safetensors"
FORMAT = "erasekit-mask"
FORMAT_VERSION = 1


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
        sampling = dict(self.config.get("settings", {}).get("sampling", {}))
        generation_steps = sampling.pop("generation_steps", None)
        if generation_steps is not None:
            sampling["steps"] = generation_steps
        return sampling


def denoiser_config_hash(denoiser: nn.Module) -> str:
    """sha256 of the denoiser's public config (class name included), independent of key order."""
    config = {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")}
    config["_class_name"] = type(denoiser).__name__
    return json_sha256(config, ensure_ascii=True, default=list)


def base_model_record(denoiser: nn.Module, model_id: str, revision: str | None = None) -> dict[str, Any]:
    """What a mask artefact records about the model it was trained on."""
    return {
        "id": model_id,
        "revision": revision,
        "denoiser_class": type(denoiser).__name__,
        "denoiser_config_sha256": denoiser_config_hash(denoiser),
    }


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


def write_mask_files(folder: Path, logits: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write the two artefact files into an existing folder."""
    tensors = {k: v.detach().to(torch.float32).cpu().contiguous() for k, v in logits.items()}
    bad = _non_finite(tensors)
    if bad:
        # a NaN logit is neither open nor closed; writing it would only move the failure to whoever loads the mask
        raise MaskFileError(
            f"refusing to write a mask with non-finite logits ({bad}); lower the mask learning rates (mask.*.lr)"
        )
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "erasekit_version": __version__, **config}
    masked = sum(int((v <= 0).sum()) for v in tensors.values())
    total = sum(v.numel() for v in tensors.values())
    record.setdefault(
        "stats", {"masked_units": masked, "total_units": total, "masked_fraction": masked / total if total else 0.0}
    )
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": FORMAT})
    (folder / CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=False, default=str))


def load_mask_artifact(path: str | Path) -> MaskArtifact:
    """Read a mask artefact; a missing or corrupt file raises :class:`MaskFileError`."""
    folder = Path(path)
    if not folder.is_dir():
        raise MaskFileError(f"mask folder {str(folder)!r} does not exist; pass the --output folder of `erasekit erase`")
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for file in (config_file, weights_file):
        if not file.is_file():
            raise MaskFileError(f"mask folder {str(folder)!r} has no {file.name}; it is not an erasekit mask artefact")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise MaskFileError(f"{config_file} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(config, dict):
        raise MaskFileError(
            f"{config_file} is not an erasekit mask config (a JSON {type(config).__name__}, not an object)"
        )
    if config.get("format") != FORMAT:
        raise MaskFileError(f"{config_file} is not an erasekit mask config (format {config.get('format')!r})")
    _check_format_version(config, config_file)
    try:
        logits = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MaskFileError(f"{weights_file} is corrupt or not a safetensors file: {first}") from None
    bad = _non_finite(logits)
    if bad:
        raise MaskFileError(f"{weights_file} holds non-finite logits ({bad}); the mask is corrupt: train it again")
    return MaskArtifact(logits={k: v.to(torch.float32) for k, v in logits.items()}, config=config, path=folder)


def _check_format_version(config: dict[str, Any], config_file: Path) -> None:
    """Refuse an artefact written in a newer format than this erasekit reads (docs/design.md, the
    version rule); every older version stays readable. A config without the field is version 1."""
    version = config.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise MaskFileError(f"{config_file} has format_version {version!r}; expected a positive integer")
    if version > FORMAT_VERSION:
        raise MaskFileError(
            f"{config_file} has format_version {version}, newer than the version {FORMAT_VERSION} that "
            f"erasekit {__version__} reads; upgrade erasekit to load it"
        )


def _non_finite(logits: dict[str, torch.Tensor]) -> str:
    """``""`` when every logit is finite, else how many are not and the first key holding one."""
    bad = {k: int((~torch.isfinite(v.float())).sum()) for k, v in logits.items()}
    bad = {k: n for k, n in bad.items() if n}
    return f"{sum(bad.values())} in {len(bad)} tensors, first {next(iter(bad))!r}" if bad else ""


def check_artifact(artifact: MaskArtifact, arch: Architecture, denoiser: nn.Module) -> list[MaskSite]:
    """Check an artefact against a denoiser; return the sites its keys name (in model order).

    Raises:
        MaskMismatchError: naming the first problem (another model class, an unknown key, a shape).
    """
    where = f"mask {str(artifact.path)!r}" if artifact.path else "mask"
    base = artifact.config.get("base_model", {})
    trained_on = base.get("denoiser_class")
    here = type(denoiser).__name__
    if trained_on and trained_on != here:
        raise MaskMismatchError(f"{where} was made for a {trained_on} (model {base.get('id')!r}), not this {here}")
    # same class and width but another depth (or any other config change) can fit every key and shape
    recorded, actual = base.get("denoiser_config_sha256"), denoiser_config_hash(denoiser)
    if recorded and recorded != actual:
        raise MaskMismatchError(
            f"{where} was made for another {here} (model {base.get('id')!r}, denoiser config sha256 {recorded[:12]}), "
            f"not this one (model {denoiser.config.get('_name_or_path', '?')!r}, sha256 {actual[:12]}); "
            "use the model the mask was trained on"
        )
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
