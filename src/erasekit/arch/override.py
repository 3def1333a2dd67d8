"""Sampling overrides: how an inference-time erasure (SLD, FlowEdit) changes the way images are sampled.

Every image erasekit generates goes through :func:`erasekit.generate.generate_latents` (``erasekit
generate``, the evaluation runner, the ShapesCanvas world and demo). That function asks
:func:`sampling_override` once whether an override is installed on the pipeline and, if so, lets the
override sample instead of the default trajectory. An erasure installs its override with
:func:`install_sampling_override`; the returned handle's ``remove()`` uninstalls it, after which the
default path runs again, bit for bit as before (the default path never sees the override).

The registry is keyed by the pipeline object (weakly, so that it never keeps a pipeline alive and
``save_pretrained`` never sees it). One override at a time: a second is refused in one line, because
two sampling changes do not compose in general (each would replace the other's guidance).
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from typing import Any

import torch

from ..errors import UnsupportedError
from .base import Trajectory

__all__ = ["OverrideHandle", "SamplingOverride", "install_sampling_override", "sampling_override"]


class SamplingOverride(ABC):
    """What replaces the default sampler while an inference-time erasure is applied.

    ``sample`` receives exactly what :func:`~erasekit.generate.generate_latents` received and returns
    what it returns: the final latents (one row per prompt) and a :class:`~erasekit.arch.base.Trajectory`
    whose ``decode`` turns them into images.
    """

    #: named in the refusal of a second override
    name: str = "sampling override"

    @abstractmethod
    def sample(
        self,
        pipe: Any,
        prompts: list[str],
        seeds: list[int],
        *,
        steps: int,
        resolution: int,
        guidance_scale: float,
        max_sequence_length: int,
    ) -> tuple[torch.Tensor, Trajectory]:
        """Final latents for ``prompts`` (one noise seed each) and the trajectory (for ``decode``)."""


_INSTALLED: weakref.WeakKeyDictionary[Any, SamplingOverride] = weakref.WeakKeyDictionary()


class OverrideHandle:
    """Removes an installed override (idempotent): the pipeline samples by default again."""

    def __init__(self, pipe: Any, override: SamplingOverride) -> None:
        self._pipe = weakref.ref(pipe)
        self.override = override

    def remove(self) -> None:
        pipe = self._pipe()
        if pipe is not None and _INSTALLED.get(pipe) is self.override:
            del _INSTALLED[pipe]


def install_sampling_override(pipe: Any, override: SamplingOverride) -> OverrideHandle:
    """Make ``pipe``'s generation sample with ``override`` until the handle's ``remove()``.

    Raises:
        UnsupportedError: another override is installed on ``pipe`` already.
    """
    present = _INSTALLED.get(pipe)
    if present is not None:
        raise UnsupportedError(
            f"a {present.name} already changes how this pipeline samples; inference-time erasures do not "
            f"combine, so {override.name} cannot be applied with it"
        )
    _INSTALLED[pipe] = override
    return OverrideHandle(pipe, override)


def sampling_override(pipe: Any) -> SamplingOverride | None:
    """The override installed on ``pipe``, or None (sample with the default trajectory)."""
    return _INSTALLED.get(pipe)
