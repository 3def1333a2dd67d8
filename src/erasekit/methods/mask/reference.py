"""Import masks trained by the reference implementation of minimalist concept erasure (FLUX.1).

The reference saves three PyTorch files, each a plain list of 1-D logit tensors (bfloat16), and
keeps a unit where its logit is positive -- the same convention as an erasekit artefact, so the
logits are copied unchanged (as float32):

* ``attn.pt`` -- one tensor of ``(heads,)`` per double block, then one per single block. A double
  block's joint attention has one set of heads for both streams, so its logits go to both the
  image-stream (``attn.to_out.0``) and the text-stream (``attn.to_add_out``) head sites.
* ``ff.pt`` -- per double block, the image-stream ``ff`` then the text-stream ``ff_context``
  hidden neurons.
* ``norm.pt`` -- per double block, the ``norm1_context.linear`` modulation channels.

The files are third-party: they are read with ``weights_only=True`` and never unpickled unsafely.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...arch.base import architecture_for
from ...errors import MaskFileError, MaskMismatchError
from ...outputs import file_sha256
from .artifact import base_model_record, save_mask_artifact

__all__ = ["import_minimalist_flux", "import_minimalist_flux_artifact", "load_reference_list"]

PathLike = str | os.PathLike[str]

SOURCE = "minimalist-flux reference import"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unpickler_reason(exc: BaseException) -> str:
    # torch's message opens with advice to load unsafely; keep only the line that says what was refused.
    for line in str(exc).splitlines():
        line = line.strip()
        if line.startswith("WeightsUnpickler error:"):
            reason = line.removeprefix("WeightsUnpickler error:").strip()
            return reason.split(". Please use", 1)[0].rstrip(".")
    return "it is corrupt or holds objects other than tensors, lists and numbers"


def load_reference_list(path: PathLike) -> list[torch.Tensor]:
    """Read a reference mask file: a list of 1-D tensors, loaded with ``weights_only=True``.

    Raises:
        MaskFileError: the file is missing, unreadable or corrupt, needs unsafe unpickling (it holds
            objects other than tensors and plain containers), or is not a list of 1-D tensors.
    """
    file = Path(path)
    if not file.is_file():
        what = "is a folder, not a file" if file.is_dir() else "does not exist"
        raise MaskFileError(f"reference mask file {str(file)!r} {what}")
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's weights-only unpickler refuses any global it does not allow (custom classes, code).
        raise MaskFileError(
            f"{str(file)!r} was refused by the safe loader (weights_only=True): {_unpickler_reason(exc)}; "
            "a reference mask file holds only a list of tensors"
        ) from None
    except MemoryError:
        raise
    except Exception as exc:  # garbage bytes make the unpickler fail with arbitrary types (IndexError, ...)
        raise MaskFileError(f"{str(file)!r} is corrupt or not a PyTorch file: {_first_line(exc)}") from None
    if not isinstance(data, list):
        raise MaskFileError(f"{str(file)!r} holds a {type(data).__name__}, expected a list of 1-D tensors")
    for i, item in enumerate(data):
        if not isinstance(item, torch.Tensor):
            raise MaskFileError(f"{str(file)!r}: item {i} is a {type(item).__name__}, expected a 1-D tensor")
        if item.dim() != 1:
            raise MaskFileError(f"{str(file)!r}: tensor {i} has shape {tuple(item.shape)}, expected a 1-D tensor")
        if item.is_complex():
            raise MaskFileError(f"{str(file)!r}: tensor {i} is complex ({item.dtype}), expected real logits")
        if item.is_floating_point() and bool(torch.isnan(item).any()):
            # A NaN logit neither keeps nor masks a unit: refuse rather than guess.
            raise MaskFileError(f"{str(file)!r}: tensor {i} contains NaN logits")
    return [item.detach() for item in data]


def import_minimalist_flux(
    attn: PathLike | None,
    ff: PathLike | None,
    norm: PathLike | None,
    denoiser: nn.Module,
) -> dict[str, torch.Tensor]:
    """Map the reference's FLUX mask files onto erasekit site keys of ``denoiser``.

    Any of the three files may be ``None`` (those units stay unmasked), but not all of them.
    ``denoiser`` may live on the meta device: only its module tree and shapes are used.

    Returns:
        float32 logits keyed ``kind/module.path`` (a unit is kept where its logit is > 0), in the
        model's site order.

    Raises:
        MaskFileError: no file given, or a file is unreadable / not a list of 1-D tensors.
        MaskMismatchError: naming the first file whose tensor count or a tensor's shape does not fit.
    """
    if attn is None and ff is None and norm is None:
        raise MaskFileError("no reference mask files given: pass at least one of --attn, --ff, --norm")
    arch = architecture_for(denoiser)
    if arch.family != "flux":
        raise MaskMismatchError(
            "minimalist-flux masks are for FLUX transformers, "
            f"not this {type(denoiser).__name__} (family {arch.family})"
        )
    sites = {site.key: site for site in arch.sites(denoiser)}
    num_double = len(denoiser.transformer_blocks)
    num_single = len(denoiser.single_transformer_blocks)
    logits: dict[str, torch.Tensor] = {}

    def place(file: Path, tensors: list[torch.Tensor], keys_per_tensor: list[list[str]], layout: str) -> None:
        expected = len(keys_per_tensor)
        if len(tensors) != expected:
            raise MaskMismatchError(
                f"{file.name} has {len(tensors)} tensors, this model has {layout} -> expected {expected}"
            )
        for index, (tensor, keys) in enumerate(zip(tensors, keys_per_tensor)):
            for key in keys:
                site = sites.get(key)
                if site is None:
                    raise MaskMismatchError(f"{file.name} tensor {index}: this model has no mask site {key!r}")
                if tuple(tensor.shape) != (site.num_units,):
                    kind, _, module = key.partition("/")
                    raise MaskMismatchError(
                        f"{file.name} tensor {index} has shape {tuple(tensor.shape)}, "
                        f"this model's {module} has ({site.num_units},) {kind}"
                    )
                # One copy per key: safetensors refuses tensors that share storage.
                logits[key] = tensor.to(torch.float32).clone()

    if attn is not None:
        file = Path(attn)
        keys = [
            [f"heads/transformer_blocks.{i}.attn.to_out.0", f"heads/transformer_blocks.{i}.attn.to_add_out"]
            for i in range(num_double)
        ] + [[f"heads/single_transformer_blocks.{j}.proj_out"] for j in range(num_single)]
        place(file, load_reference_list(file), keys, f"{num_double} double + {num_single} single blocks")
    if ff is not None:
        file = Path(ff)
        keys = []
        for i in range(num_double):
            keys += [[f"neurons/transformer_blocks.{i}.ff.net.2"], [f"neurons/transformer_blocks.{i}.ff_context.net.2"]]
        place(file, load_reference_list(file), keys, f"{num_double} double blocks")
    if norm is not None:
        file = Path(norm)
        keys = [[f"norm/transformer_blocks.{i}.norm1_context.linear"] for i in range(num_double)]
        place(file, load_reference_list(file), keys, f"{num_double} double blocks")
    return {key: logits[key] for key in sites if key in logits}


def import_minimalist_flux_artifact(
    attn: PathLike | None,
    ff: PathLike | None,
    norm: PathLike | None,
    model: str,
    output: PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Import reference FLUX masks for ``model`` and write them as an erasekit mask artefact.

    ``model`` (a pipeline folder, transformer folder/config, or hub id) is only read for its config:
    the denoiser is built on the meta device, so no weights are needed.

    Returns:
        The artefact folder ``output``.

    Raises:
        ModelLoadError, MaskFileError, MaskMismatchError: see :func:`erasekit.inspect.instantiate_denoiser_on_meta`
            and :func:`import_minimalist_flux`.
        FileExistsError: ``output`` exists and ``overwrite`` is false.
    """
    from ...inspect import instantiate_denoiser_on_meta

    denoiser = instantiate_denoiser_on_meta(model)
    logits = import_minimalist_flux(attn, ff, norm, denoiser)
    files: dict[str, Any] = {}
    for name, path in (("attn", attn), ("ff", ff), ("norm", norm)):
        if path is not None:
            files[name] = {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}
    unit_kinds = sorted({key.partition("/")[0] for key in logits})
    masked = {
        kind: sum(int((v <= 0).sum()) for k, v in logits.items() if k.startswith(f"{kind}/")) for kind in unit_kinds
    }
    config: dict[str, Any] = {
        "method": "mask",
        "source": SOURCE,
        "files": files,
        "base_model": base_model_record(denoiser, model),
        "unit_kinds": unit_kinds,
        "parameterization": "binary",
        "masked_units_per_kind": masked,
        "notes": "double-block head logits apply to both streams (the joint attention shares its heads)",
    }
    return save_mask_artifact(output, logits, config, overwrite=overwrite)
