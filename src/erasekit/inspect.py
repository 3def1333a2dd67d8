"""Inspect a model's maskable units without loading its weights.

The denoiser is built from its config on the ``meta`` device: every parameter has a shape but no
storage, so even the 12-billion-parameter FLUX.1 transformer is inspected in a fraction of a second
and without downloading anything (the published FLUX.1 configs ship with erasekit).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import supported_classes  # noqa: F401  (importing the package registers every family)
from .arch.base import (
    Architecture,
    architecture_by_class_name,
    count_units,
    denoiser_class,
    known_config,
    known_model_ids,
)
from .errors import ModelLoadError

__all__ = ["format_inspection", "inspect_model", "instantiate_denoiser_on_meta", "looks_like_path"]

# A hub repository id: exactly one slash between an owner and a name.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
# The first numbered component of a module path ("transformer_blocks.3") names its block.
_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def looks_like_path(model: str) -> bool:
    """Whether ``model`` names a local path rather than a hub id.

    It does when it exists, starts with ``.``, ``/`` or ``~``, or contains a path separator and is
    not of the hub form ``owner/name``.
    """
    if os.path.exists(os.path.expanduser(model)):
        return True
    if model.startswith((".", "/", "~")):
        return True
    separators = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return any(sep in model for sep in separators) and not _HUB_ID.match(model)


def _read_local_config(model: str) -> dict[str, Any]:
    path = Path(os.path.expanduser(model))
    if not path.exists():
        raise ModelLoadError(
            f"model path {model!r} does not exist; pass a pipeline folder, a transformer folder, "
            "its config.json, or a hub id such as black-forest-labs/FLUX.1-schnell"
        )
    if path.is_file() and path.name == "model_index.json":
        path = path.parent
    try:
        return load_denoiser_config(path)
    except FileNotFoundError:
        raise ModelLoadError(
            f"model path {model!r} has no transformer/config.json or config.json; "
            "pass a diffusers pipeline folder, a transformer folder, or a config.json file"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"the denoiser config under {model!r} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read the denoiser config under {model!r}: {exc.strerror or exc}") from None


DENOISER_SUBFOLDERS = ("transformer", "unet")


def load_denoiser_config(path: Path) -> dict[str, Any]:
    """The denoiser config of a pipeline folder, a denoiser folder, or a config.json file."""
    candidates = [path / sub / "config.json" for sub in DENOISER_SUBFOLDERS] + [path / "config.json", path]
    for candidate in candidates:
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise FileNotFoundError(path)


def _read_hub_config(model: str) -> dict[str, Any]:
    bundled = known_config(model)
    if bundled is not None:
        return bundled
    from diffusers import FluxTransformer2DModel

    reason = ""
    for subfolder in DENOISER_SUBFOLDERS:
        try:
            with warnings.catch_warnings():
                # huggingface_hub deprecation noise from diffusers' download call says nothing useful here.
                warnings.simplefilter("ignore")
                # load_config only reads config.json, whatever the class: any ModelMixin serves.
                return dict(FluxTransformer2DModel.load_config(model, subfolder=subfolder))
        except Exception as exc:  # the hub client raises many unrelated types (OSError, ValueError, HTTP errors)
            reason = reason or (str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    raise ModelLoadError(
        f"cannot load the denoiser config of hub id {model!r} (no local folder of that name either): {reason} "
        f"(offline, only cached models and {', '.join(known_model_ids())} work)"
    )


# Published PixArt and DiT folders name the generic class; diffusers picks the real one by norm type.
_GENERIC_TRANSFORMER = {"ada_norm_zero": "DiTTransformer2DModel", "ada_norm_single": "PixArtTransformer2DModel"}


def _load_config(model: str) -> dict[str, Any]:
    config = _read_local_config(model) if looks_like_path(model) else _read_hub_config(model)
    if isinstance(config, dict) and config.get("_class_name") == "Transformer2DModel":
        config["_class_name"] = _GENERIC_TRANSFORMER.get(config.get("norm_type", ""), "Transformer2DModel")
    if not isinstance(config, dict) or "_class_name" not in config:
        raise ModelLoadError(f"the denoiser config of {model!r} has no _class_name; it is not a diffusers model config")
    return config


def instantiate_denoiser_on_meta(model: str) -> nn.Module:
    """Build the denoiser of ``model`` on the meta device: right module tree and shapes, no weights.

    Args:
        model: a pipeline folder, a transformer folder or its ``config.json``, or a hub id
            (the FLUX.1-schnell and FLUX.1-dev configs are bundled and work offline).

    Raises:
        ModelLoadError: the path does not exist, the config cannot be read, or its class is not a
            supported denoiser (the message lists the supported classes).
    """
    config = _load_config(model)
    name = str(config["_class_name"])
    try:
        architecture_by_class_name(name)
    except ModelLoadError:
        raise ModelLoadError(
            f"unsupported model family: {model!r} has a {name} denoiser; supported: {', '.join(supported_classes())}"
        ) from None
    cls = denoiser_class(name)
    try:
        with torch.device("meta"):
            return cls.from_config(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot build {name} from the config of {model!r}: {exc}") from None


def _blocks(denoiser: nn.Module, arch: Architecture) -> dict[str, int]:
    blocks: dict[str, set[str]] = defaultdict(set)
    for site in arch.sites(denoiser):
        match = _BLOCK.match(site.module)
        blocks[site.block_type].add(match.group(1) if match else site.module)
    return {block_type: len(names) for block_type, names in blocks.items()}


def inspect_model(model: str) -> dict[str, Any]:
    """Summarise the maskable units of ``model`` without loading weights.

    Returns:
        ``{"model", "denoiser_class", "family", "parameters", "units", "blocks", "config"}``:
        ``units`` is :func:`erasekit.arch.count_units` over every mask site (``per_kind``,
        ``per_block_type`` keyed ``kind:block_type[/stream]``, ``total``); ``blocks`` counts the
        blocks of each block type; ``config`` is the denoiser's public config.
    """
    denoiser = instantiate_denoiser_on_meta(model)
    name = type(denoiser).__name__
    arch = architecture_by_class_name(name)
    config = {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")}
    return {
        "model": model,
        "denoiser_class": name,
        "family": arch.family,
        "parameters": sum(p.numel() for p in denoiser.parameters()),
        "units": count_units(arch.sites(denoiser)),
        "blocks": _blocks(denoiser, arch),
        "config": json.loads(json.dumps(config, default=list)),
    }


def format_inspection(info: dict[str, Any]) -> str:
    """A plain-text table of :func:`inspect_model`'s result: units per kind and per block type/stream."""
    units = info["units"]
    blocks = info.get("blocks", {})
    lines = [
        f"model:      {info['model']}",
        f"denoiser:   {info['denoiser_class']} (family {info['family']})",
        f"parameters: {info['parameters']:,}",
        "blocks:     " + (", ".join(f"{n} {t}" for t, n in blocks.items()) or "none"),
        "",
    ]
    rows: list[tuple[str, str, str]] = []
    kinds = list(units["per_kind"])
    for kind in kinds:
        for label, count in units["per_block_type"].items():
            site_kind, _, where = label.partition(":")
            if site_kind == kind:
                rows.append((kind, where, f"{count:,}"))
        rows.append((kind, "all", f"{units['per_kind'][kind]:,}"))
    rows.append(("total", "", f"{units['total']:,}"))
    header = ("unit kind", "block type/stream", "units")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]

    def line(row: tuple[str, str, str]) -> str:
        return f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}"

    lines += [line(header), "  ".join("-" * w for w in widths)]
    for row in rows:
        if row[0] == "total":
            lines.append("  ".join("-" * w for w in widths))
        lines.append(line(row))
    return "\n".join(lines)
