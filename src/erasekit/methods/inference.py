"""What the inference-time methods (SLD, FlowEdit) share: an erasure without payload that changes sampling.

Such an erasure is its record alone (``erasure.json``: the settings it samples with); ``apply`` installs
its :class:`~erasekit.arch.override.SamplingOverride` on the pipeline, so that every image erasekit
generates (``generate``, ``evaluate``, the ShapesCanvas demo) is sampled by it, and the handle's
``remove()`` uninstalls it. It changes no weight, so it cannot be folded (the base class refuses in one
line and says to use ``generate`` / ``evaluate``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

from ..arch import denoiser_of
from ..arch.override import SamplingOverride, install_sampling_override
from ..config import EraseConfig, config_to_dict
from .base import (
    Cost,
    Erasure,
    ErasureHandle,
    base_model_record,
    concept_fields,
    generation_defaults,
    peak_memory_bytes,
)


class InferenceTimeErasure(Erasure):
    """An erasure that changes how images are sampled; subclasses build the override (:meth:`override`)."""

    payload: ClassVar[tuple[str, ...]] = ()
    foldable: ClassVar[bool] = False

    @property
    def settings(self) -> dict[str, Any]:
        """The method's own section of the recorded settings."""
        return dict(self.record.get("settings", {}).get(self.method.replace("-", "_"), {}))

    def override(self, pipe: Any) -> SamplingOverride:
        """The sampling override for ``pipe`` (may refuse a pipeline it cannot run on, in one line)."""
        raise NotImplementedError(f"{type(self).__name__} does not define override()")

    def apply(self, pipe: Any) -> ErasureHandle:
        """Install the override: ``pipe``'s generation samples with it until ``remove()``."""
        self.check(pipe)
        return install_sampling_override(pipe, self.override(pipe))

    def write_payload(self, folder: Path) -> None:
        """Nothing to write: the record holds everything."""

    @classmethod
    def from_folder(cls, folder: Path, record: dict[str, Any]) -> Erasure:
        return cls(record, folder)


def fit_inference_time(
    erasure_class: type[InferenceTimeErasure],
    pipe: Any,
    config: EraseConfig,
    output: str | Path,
    *,
    changes: str,
    extra_calls_per_step: float,
    model_id: str | None = None,
    fields: dict[str, Any] | None = None,
) -> InferenceTimeErasure:
    """Write the artefact of an inference-time erasure (its record alone) atomically to ``output``.

    Args:
        erasure_class: the method's erasure class.
        pipe: the loaded pipeline (its denoiser is recorded, so that the erasure applies to that model only).
        config: the resolved configuration; recorded whole as ``settings``.
        output: the folder to create.
        changes: what the method changes, in words (the cost's ``changes``).
        extra_calls_per_step: :attr:`Cost.extra_denoiser_calls_per_step`.
        model_id: recorded as the base model's id (default ``config.model.id``).
        fields: the method's own record fields.
    """
    started = time.perf_counter()
    _, denoiser = denoiser_of(pipe)
    record: dict[str, Any] = {
        "method": erasure_class.method,
        "base_model": base_model_record(denoiser, model_id or config.model.id, config.model.revision),
        **concept_fields(config),
        "settings": config_to_dict(config),
        "generation": generation_defaults({"sampling": config_to_dict(config.sampling)}),
        **(fields or {}),
    }
    erasure = erasure_class(record)
    # nothing is trained: the cost is writing the record; peak memory is the process's so far
    record["cost"] = Cost(
        changes=changes,
        seconds=max(time.perf_counter() - started, 1e-6),
        peak_memory_bytes=peak_memory_bytes(getattr(denoiser, "device", None)),
        extra_denoiser_calls_per_step=extra_calls_per_step,
    ).to_dict()
    erasure.save(output)
    return erasure
