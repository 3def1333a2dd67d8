"""The erasure of every weight-editing method (UCE, ESD, CA, EAP): replaced denoiser parameters.

The payload ``weights.safetensors`` holds only the parameters a fit changed, by their denoiser parameter
name, in the dtype of the model it was fitted on. ``erasure.json`` records, per parameter, its shape and
the sha256 of the *original* tensor, so that applying the edit to other weights (another checkpoint, a
fine-tune, weights another edit already changed) is refused in one line instead of silently mixing two
models. The hashes are recorded for the fit's dtype and, when the fit ran in float32, for the float16 and
bfloat16 roundings too: a model loaded in half precision from the same checkpoint is the same model.

``apply`` copies the edited values into the parameters in place (same tensors, so hooks and offloading
keep working) and keeps the originals; ``remove()`` copies them back, bit for bit. ``fold`` (mode
``merge``) writes the edited values for good: the pipeline keeps its classes and shapes, so stock
diffusers loads it. Weight edits on disjoint parameters combine; overlapping ones are refused.

A method builds its erasure after fitting with :meth:`WeightEditErasure.from_edits` and a record from
:func:`erasure_record`.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..arch import denoiser_of
from ..config import EraseConfig, config_to_dict
from ..errors import ErasureFileError, ErasureMismatchError, UnsupportedError
from .base import Erasure, base_model_record, concept_fields, generation_defaults

WEIGHTS_NAME = "weights.safetensors"
#: The one fold of a weight edit: the edited values written into the same parameters.
MERGE = "merge"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_NAMES = {v: k for k, v in _DTYPES.items()}

#: Per denoiser, the parameter names weight edits applied to it have changed now (overlaps are refused).
_APPLIED: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's raw bytes in its own dtype (shape and dtype are recorded beside it)."""
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def original_hashes(tensor: torch.Tensor) -> dict[str, str]:
    """The sha256 of ``tensor`` by dtype name: its own dtype, and from float32 also its half roundings."""
    hashes = {_NAMES.get(tensor.dtype, str(tensor.dtype)): tensor_sha256(tensor)}
    if tensor.dtype == torch.float32:
        for name in ("float16", "bfloat16"):
            hashes[name] = tensor_sha256(tensor.to(_DTYPES[name]))
    return hashes


def erasure_record(
    method: str,
    config: EraseConfig,
    denoiser: nn.Module,
    family: str,
    *,
    model_id: str | None = None,
    changes: str = "",
    seconds: float = 0.0,
    peak_memory_bytes: int = 0,
) -> dict[str, Any]:
    """The record fields every fitted erasure carries (``erasure.json`` less format fields and payload)."""
    settings = config_to_dict(config)
    return {
        "method": method,
        "family": family,
        "base_model": base_model_record(denoiser, model_id or config.model.id, config.model.revision),
        **concept_fields(config),
        "settings": settings,
        "generation": generation_defaults(settings),
        "cost": {"changes": changes, "seconds": round(seconds, 3), "peak_memory_bytes": peak_memory_bytes},
    }


class WeightEditHandle:
    """Applied weight edits: :meth:`remove` copies the original values back (bit for bit), once."""

    def __init__(self, denoiser: nn.Module, originals: dict[str, torch.Tensor]) -> None:
        self.denoiser = denoiser
        self.originals = originals

    def remove(self) -> None:
        with torch.no_grad():
            for name, value in self.originals.items():
                self.denoiser.get_parameter(name).copy_(value)
        _APPLIED.get(self.denoiser, set()).difference_update(self.originals)
        self.originals = {}


class WeightEditErasure(Erasure):
    """Replaced denoiser parameters (``weights``: name -> edited tensor) and the record pinning the originals.

    Each weight-editing method subclasses it with its own :attr:`method` name (the registry maps an
    artefact's method to its erasure class); nothing else needs overriding.
    """

    method: ClassVar[str] = ""
    payload = (WEIGHTS_NAME,)
    foldable = True
    fold_modes = (MERGE,)

    def __init__(self, weights: dict[str, torch.Tensor], record: dict[str, Any], path: Path | None = None) -> None:
        super().__init__(record, path)
        self.weights = weights

    # ------------------------------------------------------------------ building
    @classmethod
    def from_edits(
        cls, denoiser: nn.Module, edits: Mapping[str, torch.Tensor], record: dict[str, Any]
    ) -> WeightEditErasure:
        """The erasure of ``edits`` (parameter name -> new value) fitted on ``denoiser`` (still unedited).

        Edits equal to the original are dropped; the rest are stored on the CPU in the parameter's dtype.
        ``record`` (see :func:`erasure_record`) gains ``weights`` (per parameter its shape, dtype and the
        originals' sha256) and the cost's ``parameters_changed``.

        Raises:
            ValueError: a name that is not a parameter of ``denoiser``, or a value of another shape.
        """
        weights: dict[str, torch.Tensor] = {}
        described: dict[str, Any] = {}
        for name, value in edits.items():
            try:
                original = denoiser.get_parameter(name)
            except AttributeError:
                raise ValueError(f"{type(denoiser).__name__} has no parameter {name!r}") from None
            if tuple(value.shape) != tuple(original.shape):
                raise ValueError(
                    f"edit of {name} has shape {tuple(value.shape)}, the parameter {tuple(original.shape)}"
                )
            new = value.detach().to(device="cpu", dtype=original.dtype).contiguous()
            old = original.detach().cpu()
            if torch.equal(new, old):
                continue
            weights[name] = new
            described[name] = {
                "shape": list(original.shape),
                "dtype": _NAMES.get(original.dtype, str(original.dtype)),
                "original_sha256": original_hashes(old),
            }
        full = dict(record)
        full["weights"] = described
        full["cost"] = {
            **dict(full.get("cost") or {}),
            "units_changed": 0,
            "units_total": 0,
            "parameters_changed": sum(w.numel() for w in weights.values()),
        }
        return cls(weights, full)

    # ------------------------------------------------------------------ checking
    def _described(self) -> dict[str, Any]:
        described = self.record.get("weights")
        return described if isinstance(described, dict) else {}

    def check_weights(self, denoiser: nn.Module) -> None:
        """Refuse a denoiser whose parameters are not the originals this edit was made on (one line)."""
        applied = _APPLIED.get(denoiser, set())
        for name, info in self._described().items():
            if name in applied:
                raise UnsupportedError(
                    f"{self.where} changes {name}, which another applied weight edit changes already; "
                    "weight edits on the same parameters do not combine"
                )
            try:
                param = denoiser.get_parameter(name)
            except AttributeError:
                raise ErasureMismatchError(f"{self.where} edits {name}, which this model does not have") from None
            if list(param.shape) != list(info.get("shape", [])):
                raise ErasureMismatchError(
                    f"{self.where} edits {name} of shape {tuple(info.get('shape', []))}, "
                    f"but this model's is {tuple(param.shape)}"
                )
            dtype = _NAMES.get(param.dtype, str(param.dtype))
            recorded = info.get("original_sha256", {})
            if dtype not in recorded:
                raise ErasureMismatchError(
                    f"{self.where} was made on {info.get('dtype')} weights and cannot check this {dtype} model's; "
                    f"load the model in {info.get('dtype')}"
                )
            if tensor_sha256(param) != recorded[dtype]:
                raise ErasureMismatchError(
                    f"{self.where} was made for other weights: {name} differs from the original it edited "
                    "(another checkpoint, or weights already changed); use the model it was made on"
                )

    def check(self, pipe: Any) -> None:
        super().check(pipe)
        self.check_weights(denoiser_of(pipe)[1])

    # ------------------------------------------------------------------ applying and folding
    def _write(self, denoiser: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
        originals: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, value in self.weights.items():
                param = denoiser.get_parameter(name)
                if keep:
                    originals[name] = param.detach().clone()
                param.copy_(value.to(device=param.device, dtype=param.dtype))
        return originals

    def apply(self, pipe: Any) -> WeightEditHandle:
        """Copy the edited values into the denoiser's parameters; the handle's ``remove()`` restores them."""
        self.check(pipe)
        denoiser = denoiser_of(pipe)[1]
        handle = WeightEditHandle(denoiser, self._write(denoiser, keep=True))
        _APPLIED.setdefault(denoiser, set()).update(self.weights)
        return handle

    def fold(self, pipe: Any, mode: str) -> Any:
        """Write the edited values into ``pipe`` for good (mode ``merge``: same classes and shapes)."""
        self.check_foldable(mode)
        self.check(pipe)
        self._write(denoiser_of(pipe)[1], keep=False)
        return pipe

    def check_foldable(self, mode: str) -> None:
        if mode in ("prune", "zero"):
            raise UnsupportedError(
                f"a {self.method} erasure edits weights and folds with --mode {MERGE}; it masks no units to {mode}"
            )
        super().check_foldable(mode)

    @classmethod
    def combine(cls, erasures: list[Erasure]) -> Erasure:
        """Weight edits of disjoint parameters, applied together; overlapping ones are refused in one line."""
        edits = [e for e in erasures if isinstance(e, WeightEditErasure)]
        if len(edits) == 1:
            return edits[0]
        weights: dict[str, torch.Tensor] = {}
        described: dict[str, Any] = {}
        owner: dict[str, str] = {}
        for edit in edits:
            for name, value in edit.weights.items():
                if name in owner:
                    raise UnsupportedError(
                        f"{edit.where} and {owner[name]} both change {name}; weight edits on the same "
                        "parameters do not combine (apply one of them)"
                    )
                owner[name] = edit.where
                weights[name] = value
                described[name] = edit._described().get(name, {})
        record = dict(edits[0].record)
        record["weights"] = described
        record["combined_from"] = [str(e.path) if e.path else e.where for e in edits]
        record["cost"] = {
            **dict(record.get("cost") or {}),
            "parameters_changed": sum(w.numel() for w in weights.values()),
        }
        return cls(weights, record)

    # ------------------------------------------------------------------ reporting
    def changed_text(self) -> str:
        n = self.cost.parameters_changed or sum(w.numel() for w in self.weights.values())
        return f"{n:,} parameters in {len(self.weights)} tensors replaced"

    def report(self) -> dict[str, Any]:
        from ..outputs import tensors_sha256

        return {
            "parameters_changed": sum(w.numel() for w in self.weights.values()),
            "tensors_changed": sorted(self.weights),
            "weights_sha256": tensors_sha256(self.weights),
        }

    # ------------------------------------------------------------------ files
    def write_payload(self, folder: Path) -> None:
        save_file({k: v.contiguous() for k, v in self.weights.items()}, str(folder / WEIGHTS_NAME))

    @classmethod
    def from_folder(cls, folder: Path, record: dict[str, Any]) -> WeightEditErasure:
        file = folder / WEIGHTS_NAME
        try:
            weights = load_file(str(file))
        except (SafetensorError, OSError) as exc:
            raise ErasureFileError(f"{file} cannot be read as safetensors: {exc}") from None
        described = record.get("weights")
        if not isinstance(described, dict) or set(described) != set(weights):
            raise ErasureFileError(
                f"{file} does not hold the parameters {folder / 'erasure.json'} lists; the artefact is corrupt"
            )
        for name, value in weights.items():
            if list(value.shape) != list(described[name].get("shape", [])):
                raise ErasureFileError(f"{file}: {name} has shape {tuple(value.shape)}, not the recorded one")
        return cls(weights, record, folder)


__all__ = [
    "MERGE",
    "WEIGHTS_NAME",
    "WeightEditErasure",
    "WeightEditHandle",
    "erasure_record",
    "original_hashes",
    "tensor_sha256",
]
