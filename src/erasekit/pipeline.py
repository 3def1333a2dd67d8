"""Loading pipelines (applying erasures to them: :mod:`erasekit.methods`)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

# denoiser_of lives in arch (every layer needs it); imported here for its callers
from .arch import architecture_by_class_name, architecture_for, denoiser_of, supported_classes  # noqa: F401
from .errors import ModelLoadError
from .inspect import looks_like_path

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda, then mps, then cpu; anything else must name a device this torch has.

    Raises:
        ModelLoadError: a device string torch does not know, or a device this machine lacks.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    here = "cpu" + (", cuda, cuda:N" if torch.cuda.is_available() else "")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {name!r}; use auto or {here}") from None
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
    }
    if not available.get(device.type, False):
        raise ModelLoadError(
            f"device {name!r} is not available on this machine (torch {torch.__version__}); use auto or {here}"
        )
    return device


def load_pipeline(model: str, dtype: str = "auto", device: str = "auto", revision: str | None = None) -> Any:
    """Load a diffusers pipeline from a hub id or local folder and check its family is supported.

    Raises:
        ModelLoadError: missing path, unloadable folder, unsupported denoiser class, bad dtype.
    """
    from diffusers import DiffusionPipeline

    if not model or not model.strip():
        raise ModelLoadError("no model given; pass --model with a hub id or a pipeline folder")
    target = resolve_device(device)
    if dtype == "auto":
        dtype = "bfloat16" if target.type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    path = Path(model).expanduser()
    if looks_like_path(model):
        if not path.exists():
            raise ModelLoadError(f"model path {model!r} does not exist; pass a diffusers pipeline folder or a hub id")
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{model!r} is not a diffusers pipeline folder (no model_index.json)")
        trust_code = _check_denoiser_class(path / "model_index.json", model)
        model = str(path)
    else:
        trust_code = False
    try:
        pipe = DiffusionPipeline.from_pretrained(
            model, dtype=DTYPES[dtype], revision=revision, trust_remote_code=trust_code
        )
    except (OSError, ValueError) as exc:
        if not looks_like_path(model) and _hub_offline():
            # diffusers' own message runs to ~450 characters and points at a stack trace nobody is shown
            raise ModelLoadError(
                f"could not load {model!r}: it is not a local folder, so it was taken as a hub id, "
                "and it is not in the hub cache while HF_HUB_OFFLINE=1; "
                "pass a pipeline folder, or download it once with network access"
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "" if looks_like_path(model) else " (not a local folder, so it was taken as a hub id)"
        raise ModelLoadError(f"could not load {model!r}{where}: {first}") from None
    architecture_for(pipe)  # raises for unsupported families before any work is done
    pipe.to(target)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _hub_offline() -> bool:
    """Whether hub downloads are switched off (huggingface_hub reads HF_HUB_OFFLINE once, at import)."""
    from huggingface_hub.constants import is_offline_mode

    return is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _check_denoiser_class(index_file: Path, model: str) -> bool:
    """Refuse a local pipeline whose denoiser family is not supported before any weights are read.

    Returns whether the folder's denoiser is erasekit's own pruned component (``erasekit fold --mode
    prune``) with code byte-identical to the installed one: only then is the folder's code trusted.
    """
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        return False  # unreadable: from_pretrained reports it
    for attr in ("transformer", "unet"):
        entry = index.get(attr) if isinstance(index, dict) else None
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str):
            if entry[1] not in supported_classes():
                raise ModelLoadError(
                    f"unsupported model family: {model!r} has a {entry[1]} denoiser; "
                    f"supported: {', '.join(supported_classes())}"
                )
            component = index_file.parent / attr / f"{entry[0]}.py"
            if not component.is_file():
                return False
            ours = architecture_by_class_name(entry[1]).pruned_component_source()
            return component.name == ours.name and component.read_bytes() == ours.read_bytes()
    return False
