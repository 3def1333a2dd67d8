"""What an architecture file declares: mask sites, a sampler, and how masks fold into weights."""

from __future__ import annotations

import contextlib
import importlib
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelLoadError, UnsupportedError
from .guidance import Guidance


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


#: What a denoiser predicts, as :class:`NoiseSchedule` reads it.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


@dataclass(frozen=True)
class NoiseSchedule:
    """The noise levels of an N-step schedule: the latent before step ``i`` is ``alpha_i x0 + sigma_i noise``.

    ``alphas`` and ``sigmas`` are in the latent's own scale (for Euler-type samplers ``alpha = 1`` and
    the latent is unscaled; the model sees it divided by ``sqrt(alpha^2 + sigma^2)``); ``timesteps`` are
    what the denoiser receives at each step. ``prediction_type`` is what the model outputs:
    ``epsilon`` (the noise), ``v_prediction``, ``sample`` (x0) or ``flow`` (the velocity
    ``noise - x0`` of rectified flow, where ``alpha = 1 - sigma``).
    """

    timesteps: torch.Tensor
    alphas: tuple[float, ...]
    sigmas: tuple[float, ...]
    prediction_type: str

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ModelLoadError(
                f"prediction type {self.prediction_type!r} is not supported; supported: {', '.join(PREDICTION_TYPES)}"
            )

    @property
    def num_steps(self) -> int:
        return len(self.alphas)

    def check_index(self, i: int) -> int:
        """``i``, or ValueError when it is not a step of this schedule."""
        if not 0 <= i < self.num_steps:
            raise ValueError(f"step index {i} is outside this {self.num_steps}-step schedule")
        return i

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """The latent before step ``i`` for a clean latent ``x0`` and ``noise`` (stateless)."""
        i = self.check_index(i)
        return self.alphas[i] * x0 + self.sigmas[i] * noise

    def _unit(self, i: int) -> tuple[float, float, float]:
        # the model's view of the latent: divided by its norm, so that alpha^2 + sigma^2 = 1
        a, s = self.alphas[i], self.sigmas[i]
        norm = (a * a + s * s) ** 0.5
        return a / norm, s / norm, norm

    def target(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """What a perfect model outputs at step ``i`` for the latent ``add_noise(x0, noise, i)``."""
        i = self.check_index(i)
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        if self.prediction_type == "flow":
            return noise - x0
        a, s, _ = self._unit(i)
        return a * noise - s * x0

    def x0_estimate(self, z: torch.Tensor, prediction: torch.Tensor, i: int) -> torch.Tensor:
        """The clean latent the model's ``prediction`` at step ``i`` implies for the latent ``z`` (its inverse)."""
        i = self.check_index(i)
        if self.prediction_type == "epsilon":
            return (z - self.sigmas[i] * prediction) / self.alphas[i]
        if self.prediction_type == "sample":
            return prediction
        if self.prediction_type == "flow":
            return z - self.sigmas[i] * prediction
        a, s, norm = self._unit(i)
        return a * (z / norm) - s * prediction


#: ``predict(z, i, guidance=None)``: the guided model output at step ``i`` (what the sampler steps with).
PredictFn = Callable[..., torch.Tensor]


@dataclass
class Trajectory:
    """Everything one batch of prompts needs to be denoised with a stateless step function.

    ``step(z, i)`` maps the latent before step ``i`` to the latent after it; it has no internal state,
    so the same call can be recomputed with gradients on and gives the same result.

    The baselines' access (every family fills it): ``predict(z, i, guidance=None)`` is the guided
    denoiser output at step ``i`` for the latent ``z`` before it (the trajectory's guidance, or another
    :class:`~erasekit.arch.guidance.Guidance` for this call), with gradients when enabled;
    ``schedule`` its timesteps and noise levels (``add_noise``, ``target``, ``x0_estimate``);
    ``velocity_at(z, sigma, guidance=None)`` the velocity at any noise level (flow-matching families only).
    """

    noise: torch.Tensor
    num_steps: int
    step: Callable[[torch.Tensor, int], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]
    """Final latent -> images in [0, 1], shape (B, 3, H, W), float32."""
    predict: PredictFn | None = None
    schedule: NoiseSchedule | None = None
    velocity_at: PredictFn | None = None

    def _schedule(self) -> NoiseSchedule:
        if self.schedule is None:
            raise NotImplementedError(
                f"this trajectory declares no noise schedule (known prediction types: {', '.join(PREDICTION_TYPES)})"
            )
        return self.schedule

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """The latent before step ``i``: see :meth:`NoiseSchedule.add_noise`."""
        return self._schedule().add_noise(x0, noise, i)

    def x0_estimate(self, z: torch.Tensor, prediction: torch.Tensor, i: int) -> torch.Tensor:
        """The clean latent implied by ``prediction`` at step ``i``: see :meth:`NoiseSchedule.x0_estimate`."""
        return self._schedule().x0_estimate(z, prediction, i)


@dataclass(frozen=True)
class TokenEmbeddings:
    """Token embeddings that replace a text encoder's own at some positions of every prompt.

    ``positions``: ``(k,)`` token positions (the same in every row, counted in the encoder's token
    sequence, special tokens included); ``values``: ``(B, k, width)`` the embeddings put there, one
    row per prompt (a soft mixture of vocabulary rows, or any vector; gradients flow into it).
    """

    positions: torch.Tensor
    values: torch.Tensor


@contextlib.contextmanager
def replaced_token_embeddings(
    encoders: Mapping[str, tuple[Any, nn.Module]], replace: Mapping[str, TokenEmbeddings]
) -> Iterator[None]:
    """Inside the block, each named text encoder's input-embedding layer returns its output with the
    rows at ``replace[name].positions`` set to ``replace[name].values``; checks on leaving that every
    replacement was used exactly once (one encoder call per prompt batch)."""
    unknown = sorted(set(replace) - set(encoders))
    if unknown:
        raise ConfigError(f"no text encoder {', '.join(unknown)} in this pipeline; it has {', '.join(encoders)}")
    calls = dict.fromkeys(replace, 0)
    handles = []

    def hook_for(name: str) -> Callable[..., torch.Tensor]:
        slot = replace[name]

        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            calls[name] += 1
            if output.shape[0] != slot.values.shape[0]:
                raise ValueError(
                    f"{name}: {output.shape[0]} prompts encoded, {slot.values.shape[0]} rows of embeddings"
                )
            if int(slot.positions.max()) >= output.shape[1] - 1:
                # the last position holds the end-of-text token (or padding) the encoder reads
                raise ConfigError(
                    f"the prompt's free tokens reach position {int(slot.positions.max())}, past the "
                    f"{output.shape[1]} tokens {name} reads; use a shorter prompt or fewer tokens"
                )
            # out of place: the embedding layer's output is a leaf of nothing, and its copy carries the gradient
            out = output.clone()
            out[:, slot.positions.to(out.device)] = slot.values.to(device=out.device, dtype=out.dtype)
            return out

        return hook

    try:
        for name in replace:
            encoder = encoders[name][1]
            weight = encoder.get_input_embeddings().weight
            # T5 reads its tokens through a copy of the input-embedding module that shares its weight
            for layer in encoder.modules():
                if isinstance(layer, nn.Embedding) and layer.weight is weight:
                    handles.append(layer.register_forward_hook(hook_for(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()
    unused = [name for name, n in calls.items() if n != 1]
    if unused:
        raise RuntimeError(f"token embeddings of {', '.join(unused)} were applied {calls} times, expected once each")


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

    #: whether the denoiser samples a flow (velocity prediction, ``Trajectory.velocity_at``)
    flow_matching: bool = False
    #: whether the denoiser is conditioned on text (False for class-conditioned DiT)
    text_conditioned: bool = True
    #: kinds of text-conditioning modules this family has (see :meth:`text_conditioning_modules`)
    text_conditioning_kinds: tuple[str, ...] = ()

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

    def text_encoders(self, pipe: Any) -> dict[str, tuple[Any, nn.Module]]:
        """The text encoders that read a prompt, by pipeline attribute: ``(tokenizer, encoder)``.

        Raises:
            UnsupportedError: a family without a text encoder (default).
        """
        raise UnsupportedError(f"the {self.family} family has no text encoder to optimise prompt tokens through")

    def encode_conditional(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        """The prompts' own part of :meth:`encode_prompts` (no negative rows), computed with gradients
        wherever they are enabled; each text encoder runs once on the batch.

        Raises:
            UnsupportedError: a family without a text encoder (default).
        """
        raise UnsupportedError(f"the {self.family} family has no text encoder to optimise prompt tokens through")

    def encode_token_embeddings(
        self,
        pipe: Any,
        prompts: list[str],
        max_sequence_length: int,
        replace: Mapping[str, TokenEmbeddings],
        unconditional: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """:meth:`encode_prompts` of ``prompts`` with some token embeddings replaced, differentiable in them.

        ``replace`` maps text encoders (keys of :meth:`text_encoders`) to the embeddings that replace
        that encoder's token embeddings at the given positions (the other encoders see the prompts as
        tokenised). The conditional outputs are computed with gradients on; the rest of the dict (the
        negative rows) is ``unconditional`` when given (an earlier :meth:`encode_prompts` of as many
        prompts), else computed without gradients. With no replacement the result equals
        :meth:`encode_prompts` of ``prompts``.
        """
        encoders = self.text_encoders(pipe)
        base = unconditional if unconditional is not None else self.encode_prompts(pipe, prompts, max_sequence_length)
        with replaced_token_embeddings(encoders, replace), torch.enable_grad():
            conditional = self.encode_conditional(pipe, prompts, max_sequence_length)
        return {**base, **conditional}

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
        guidance: Guidance | None = None,
    ) -> Trajectory:
        """The stateless trajectory of a batch: ``encoded`` from :meth:`encode_prompts`, one noise seed per row.

        ``guidance`` replaces the classifier-free guidance step (``None``: classifier-free guidance
        when ``guidance_scale > 1`` and the model has it, else the prompts alone, as always).
        ``guidance_scale`` still feeds models that take the scale as an input (guidance-distilled
        FLUX, LCM UNets).
        """

    def supports_cfg(self, pipe: Any) -> bool:
        """Whether the model has true classifier-free guidance (an unconditional branch); default yes."""
        return True

    def text_conditioning_modules(
        self, denoiser: nn.Module, kinds: tuple[str, ...] | None = None
    ) -> dict[str, nn.Linear]:
        """The Linear layers that read the text conditioning, by module path, in module order.

        ``kinds`` selects among :attr:`text_conditioning_kinds` (default: all of them):
        ``key_value`` (the keys and values computed from the text: cross-attention ``attn2.to_k/to_v``,
        or the text stream's ``add_k_proj/add_v_proj``), ``context`` (the projection of the text
        encoder's sequence into the denoiser, ``context_embedder``) and ``pooled`` (the projection of
        the pooled text embedding). A family without text (DiT) returns ``{}``.

        Raises:
            ConfigError: a kind this family does not have.
        """
        wanted = self.text_conditioning_kinds if kinds is None else tuple(kinds)
        unknown = [k for k in wanted if k not in self.text_conditioning_kinds]
        if unknown:
            have = ", ".join(self.text_conditioning_kinds) or "none (it is not text-conditioned)"
            raise ConfigError(
                f"{self.family} has no text-conditioning modules of kind {', '.join(unknown)}; it has {have}"
            )
        found = {}
        for name, module in denoiser.named_modules():
            kind = self.text_conditioning_kind(name)
            if kind in wanted:
                if not isinstance(module, nn.Linear):
                    raise TypeError(f"{name}: expected nn.Linear, got {type(module).__name__}")
                found[name] = module
        return found

    def text_conditioning_kind(self, module_path: str) -> str | None:
        """The text-conditioning kind of a module path, or None; families with text override it."""
        return None

    def predict(
        self,
        pipe: Any,
        z: torch.Tensor,
        t_index: int,
        encoded: dict[str, torch.Tensor],
        *,
        steps: int,
        resolution: int,
        guidance_scale: float = 1.0,
        guidance: Guidance | None = None,
    ) -> torch.Tensor:
        """The guided denoiser output at step ``t_index`` of a ``steps``-step schedule for the latent ``z``.

        A convenience over ``trajectory(...).predict``; a loop over many steps builds the trajectory once.
        """
        trajectory = self.trajectory(
            pipe,
            encoded,
            [0] * z.shape[0],
            steps=steps,
            resolution=resolution,
            guidance_scale=guidance_scale,
            guidance=guidance,
        )
        assert trajectory.predict is not None
        return trajectory.predict(z, t_index)

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
