"""What an architecture file declares: mask sites, a sampler, and how masks fold into weights."""

from __future__ import annotations

import importlib
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError


@dataclass(frozen=True)
class MaskSite:
    """One group of maskable units and where its mask multiplies activations.

    The mask scales channels ``[start, stop)`` of the last dimension of the module's input
    (``hook="input"``: a forward pre-hook) or output (``hook="output"``), each unit covering
    ``group`` consecutive channels (a head covers ``head_dim`` channels, a neuron one).
    """

    kind: str
    module: str
    hook: str
    start: int
    stop: int
    group: int
    block_type: str
    stream: str = ""

    @property
    def num_units(self) -> int:
        return (self.stop - self.start) // self.group

    @property
    def key(self) -> str:
        """Name of this site's logit tensor in a mask artefact: ``kind/module.path``."""
        return f"{self.kind}/{self.module}"


def select_sites(
    sites: list[MaskSite],
    kinds: dict[str, tuple[bool, str, str | None]],
) -> list[MaskSite]:
    """Keep the sites whose kind is enabled and whose module path matches include / not exclude.

    ``kinds`` maps a unit kind to ``(enabled, include_regex, exclude_regex_or_None)``.
    """
    chosen = []
    for site in sites:
        enabled, include, exclude = kinds.get(site.kind, (False, ".*", None))
        if not enabled or not re.search(include, site.module):
            continue
        if exclude and re.search(exclude, site.module):
            continue
        chosen.append(site)
    return chosen


def count_units(sites: list[MaskSite]) -> dict[str, Any]:
    """Units per kind, and per kind x block type x stream."""
    per_kind: Counter[str] = Counter()
    per_block: Counter[str] = Counter()
    for site in sites:
        per_kind[site.kind] += site.num_units
        label = site.block_type + (f"/{site.stream}" if site.stream else "")
        per_block[f"{site.kind}:{label}"] += site.num_units
    return {"per_kind": dict(per_kind), "per_block_type": dict(per_block), "total": sum(per_kind.values())}


def zero_fold_site(model: nn.Module, site: MaskSite, keep: torch.Tensor) -> None:
    """Bake a binary keep-mask into the Linear layer at ``site`` by zeroing weights (shapes unchanged).

    An input site zeroes the weight columns that read the dropped channels; an output site zeroes
    the rows (and bias entries) that produce them. The result equals the hooked binary mask.
    """
    layer = model.get_submodule(site.module)
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"cannot fold into {site.module}: expected nn.Linear, got {type(layer).__name__}")
    drop = ~keep.to(torch.bool).repeat_interleave(site.group)
    index = torch.arange(site.start, site.stop)[drop.cpu()]
    with torch.no_grad():
        if site.hook == "input":
            layer.weight[:, index] = 0
        else:
            layer.weight[index, :] = 0
            if layer.bias is not None:
                layer.bias[index] = 0


@dataclass
class Trajectory:
    """Everything one batch of prompts needs to be denoised with a stateless step function.

    ``step(z, i)`` maps the latent before step ``i`` to the latent after it; it has no internal state,
    so the same call can be recomputed with gradients on and gives the same result.
    """

    noise: torch.Tensor
    num_steps: int
    step: Callable[[torch.Tensor, int], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]
    """Final latent -> images in [0, 1], shape (B, 3, H, W), float32."""


class Architecture(ABC):
    """A model family: where its units are, how to sample from it, how to fold and prune masks."""

    #: short family name stored in mask artefacts
    family: str = ""
    #: diffusers class names of the denoiser this file handles
    denoiser_classes: tuple[str, ...] = ()
    #: attribute of the pipeline that holds the denoiser (also its subfolder in a pipeline folder)
    denoiser_attr: str = "transformer"
    #: published denoiser configs by hub id, so that ``inspect`` works offline
    known_configs: dict[str, dict[str, Any]] = {}
    #: the self-contained module (in this package) defining the pruned denoiser class, which is the
    #: last of :attr:`denoiser_classes`
    pruned_module: str = ""

    # a hook that subclasses override when they need it; doing nothing is the right default
    def before_save(self, pipe: Any) -> None:  # noqa: B027
        """Make sure ``pipe.save_pretrained`` keeps what loading needs (e.g. class labels); default: nothing."""

    def execution_device(self, pipe: Any) -> torch.device:
        """Where ``pipe`` runs: its ``_execution_device``, else the device of its denoiser."""
        device = getattr(pipe, "_execution_device", None)
        return device if isinstance(device, torch.device) else getattr(pipe, self.denoiser_attr).device

    def pruned_class(self) -> type[nn.Module]:
        """The pruned denoiser class, from :attr:`pruned_module`."""
        return getattr(importlib.import_module(f"{__package__}.{self.pruned_module}"), self.denoiser_classes[-1])

    def extra_classes(self) -> dict[str, type[nn.Module]]:
        """Denoiser classes this family defines itself (its pruned variant), by class name."""
        return {self.denoiser_classes[-1]: self.pruned_class()} if self.pruned_module else {}

    @abstractmethod
    def sites(self, denoiser: nn.Module) -> list[MaskSite]:
        """Every maskable unit group of ``denoiser``, in module order."""

    @abstractmethod
    def encode_prompts(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        """Text-encoder outputs for ``prompts`` (no grad), every tensor batch-first (one row per prompt)."""

    @abstractmethod
    def trajectory(
        self,
        pipe: Any,
        encoded: dict[str, torch.Tensor],
        noise_seeds: list[int],
        *,
        steps: int,
        resolution: int,
        guidance_scale: float,
    ) -> Trajectory:
        """The stateless trajectory of a batch: ``encoded`` from :meth:`encode_prompts`, one noise seed per row."""

    @abstractmethod
    def prune(self, denoiser: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
        """Physically remove the dropped heads and neurons; returns the smaller denoiser."""

    def pruned_component_source(self) -> Path:
        """The self-contained module defining the pruned denoiser class (shipped with pruned pipelines)."""
        return Path(__file__).with_name(f"{self.pruned_module}.py")


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add an architecture to the registry under each of its denoiser class names."""
    for name in arch.denoiser_classes:
        _REGISTRY[name] = arch
    return arch


def supported_classes() -> list[str]:
    return sorted(_REGISTRY)


def architecture_for(model: Any) -> Architecture:
    """The architecture of a pipeline or denoiser, looked up by the denoiser's class name."""
    denoiser = model
    for attr in ("transformer", "unet"):
        if hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            denoiser = getattr(model, attr)
            break
    name = type(denoiser).__name__
    arch = _REGISTRY.get(name)
    if arch is None:
        raise ModelLoadError(
            f"unsupported model family: denoiser class {name}; supported: {', '.join(supported_classes())}"
        )
    return arch


def denoiser_of(pipe: Any) -> tuple[Architecture, nn.Module]:
    """The architecture and denoiser module of a pipeline.

    Raises:
        ModelLoadError: the pipeline's denoiser belongs to no registered family.
    """
    arch = architecture_for(pipe)
    return arch, getattr(pipe, arch.denoiser_attr)


def known_config(model_id: str) -> dict[str, Any] | None:
    """A bundled published denoiser config for a hub id, from any registered family."""
    for arch in set(_REGISTRY.values()):
        if model_id in arch.known_configs:
            return dict(arch.known_configs[model_id])
    return None


def known_model_ids() -> list[str]:
    return sorted({k for arch in _REGISTRY.values() for k in arch.known_configs})


def denoiser_class(name: str) -> type[nn.Module]:
    """The class of a registered denoiser name: diffusers' own, or one a family defines."""
    arch = architecture_by_class_name(name)
    extra = arch.extra_classes()
    if name in extra:
        return extra[name]
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ModelLoadError(f"denoiser class {name} is registered but not found in diffusers {diffusers.__version__}")
    return cls


def architecture_by_class_name(name: str) -> Architecture:
    """Look up an architecture by denoiser class name (as stored in configs and artefacts)."""
    arch = _REGISTRY.get(name)
    if arch is None:
        raise ModelLoadError(f"unsupported model family: {name}; supported: {', '.join(supported_classes())}")
    return arch
