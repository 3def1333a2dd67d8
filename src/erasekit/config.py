"""Typed configuration: dataclasses, strict YAML loading and ``--set a.b=value`` overrides.

A recipe (``configs/*.yaml``) is a partial :class:`EraseConfig`: keys it leaves out keep their
defaults, keys the schema does not know are an error that lists the valid ones, and every value is
checked against its declared type (no silent coercion of ``"abc"`` into a number).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

UNIT_KINDS = ("heads", "neurons", "norm")


@dataclass
class ModelConfig:
    """Which pipeline to load and how."""

    id: str = "black-forest-labs/FLUX.1-schnell"
    """Hub id or local path of a diffusers pipeline folder."""
    revision: str | None = None
    dtype: str = "auto"
    """Compute dtype: auto (bfloat16 on a GPU, float32 on a CPU), float32, float16 or bfloat16; logits stay float32."""
    device: str = "auto"
    """``auto`` picks the accelerator when there is one (cuda, then mps), else cpu."""


@dataclass
class ConceptConfig:
    """What to erase and what to keep."""

    concept: str = ""
    anchor: str = ""
    """Neutral replacement for the concept in target prompts; empty means the concept is dropped."""
    more_concepts: list[str] = field(default_factory=list)
    """Further concepts erased by the same fit (``erasekit erase --concept a --concept b``), each put through
    ``templates`` (its own name only: ``synonyms`` are the first concept's). Methods that erase one concept at
    a time refuse them."""
    more_anchors: list[str] = field(default_factory=list)
    """The anchors of ``more_concepts``, in order; empty: each of them takes ``anchor``."""
    templates: list[str] = field(
        default_factory=lambda: [
            "a photo of {concept}",
            "an image of {concept}",
            "a painting of {concept}",
            "{concept}",
        ]
    )
    synonyms: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    """Extra concept prompts, used as they are (of any of the concepts)."""
    target_prompts: list[str] = field(default_factory=list)
    """Explicit targets, one per concept prompt (templates x concepts and their names, then ``prompts``)."""
    preservation_prompts: list[str] = field(
        default_factory=lambda: [
            "a photo of a dog in a park",
            "a bowl of fruit on a wooden table",
            "a city street at night with neon lights",
            "a mountain landscape with a lake",
            "a portrait of an old man with a hat",
            "a red sports car on a road",
            "a cup of coffee next to a laptop",
            "a lighthouse on a rocky coast",
        ]
    )
    preservation_file: str | None = None
    """Text file with one preservation prompt per line (added to ``preservation_prompts``)."""


@dataclass
class UnitKindConfig:
    """Selection and learning rate of one unit kind."""

    enabled: bool = True
    include: str = ".*"
    """Regular expression a module path must match (``re.search``)."""
    exclude: str | None = None
    lr: float = 0.5


@dataclass
class MaskConfig:
    """Mask parameterisation and which units carry one."""

    parameterization: str = "hard_concrete"
    """sigmoid, hard_concrete or binary (training); inference always uses the binary mask."""
    init_lambda: float = 3.0
    temperature: float = 2.0 / 3.0
    """Hard-concrete beta."""
    gamma: float = -0.1
    zeta: float = 1.1
    straight_through: bool = True
    """For ``binary``: pass the sigmoid gradient through the step function."""
    final_threshold: float = 0.0
    """The finished mask closes the units whose logits ended below this value (training gates at 0).
    A negative value keeps open the units that training left undecided near 0; the artefact stores the
    logits minus this value, so that its rule stays logit > 0. On the ShapesCanvas demo it moves along
    the erasure/retention trade, not out of it (docs/shapescanvas.md, "Undecided units")."""
    heads: UnitKindConfig = field(default_factory=lambda: UnitKindConfig(enabled=False))
    neurons: UnitKindConfig = field(default_factory=UnitKindConfig)
    norm: UnitKindConfig = field(default_factory=UnitKindConfig)


@dataclass
class UCEConfig:
    """Unified Concept Editing (``method: uce``): the closed-form edit of the text-conditioning projections.

    Defaults are the official code's (lambda 0.5, both scales 1)."""

    kinds: list[str] = field(default_factory=list)
    """Text-conditioning module kinds to edit (``key_value``, ``context``, ``pooled``); empty: the family's
    default, ``key_value`` (``attn2.to_k/to_v``) for unet and pixart, ``context`` and ``pooled``
    (``context_embedder`` and the pooled-text projection, the only exact closed form there) for flux and sd3."""
    lam: float = 0.5
    """Pull towards the original weights (lambda)."""
    erase_scale: float = 1.0
    """Weight of the edited concept prompts (s_e); lowering it fixed noisy object erasures upstream."""
    preserve_scale: float = 1.0
    """Weight of the preservation prompts (s_p)."""
    concepts: list[str] = field(default_factory=list)
    """More concepts erased in the same edit, each to ``concept.anchor`` through ``concept.templates`` (the
    older form of ``concept.more_concepts``, which every method that erases several concepts reads)."""
    batch_size: int = 8
    """Prompts per pass when reading the projections' inputs."""


@dataclass
class SamplingConfig:
    """The denoising trajectory the mask is trained through (and generation defaults)."""

    steps: int = 4
    resolution: int = 512
    guidance_scale: float = 0.0
    """Classifier-free guidance scale (SD, SDXL, SD3, PixArt, DiT; <= 1 means none), or the distilled guidance of
    guidance-embedding models (FLUX.1-dev: 3.5; FLUX.1-schnell ignores it)."""
    max_sequence_length: int = 256
    scheduler: str = "pipeline"
    """The sampler: ``pipeline`` (the pipeline's own), or ddim, euler, dpm, pndm, flow-euler (built from its config)."""
    generation_steps: int | None = None
    """Steps to generate with when they are not ``steps``: a mask trained on a shorter trajectory than
    the model samples with. Recorded in the artefact; ``erasekit generate`` and ``erasekit evaluate``
    default to it (else to ``steps``)."""

    def for_generation(self) -> SamplingConfig:
        """These settings as images are drawn with them: ``generation_steps`` (where set) as the steps."""
        if self.generation_steps is None:
            return dataclasses.replace(self)
        return dataclasses.replace(self, steps=self.generation_steps, generation_steps=None)

    def as_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of a family's ``trajectory`` (steps, resolution, guidance scale)."""
        return {"steps": self.steps, "resolution": self.resolution, "guidance_scale": self.guidance_scale}


@dataclass
class LossConfig:
    """Weights of the objective L = erase + beta * preserve + alpha * sparsity."""

    distance: str = "mse"
    """mse or l1."""
    erase_weight: float = 1.0
    preserve_weight: float = 1.0
    sparsity_weight: float = 0.05
    intermediate_preservation: float = 0.0
    """Weight of the preservation prompts' intermediate latents: the preservation term adds this times
    the mean, over every step but the last, of the distance of the latent after that step to the
    original model's from the same noise (0: the final latents alone). The original model's latents
    come from the reference trajectory the loss already runs: no extra model evaluations."""
    intermediate_erasure: float = 0.0
    """Weight of the concept prompts' intermediate latents: the erase term adds this times the mean, over
    every step but the last, of the distance of the latent after that step to the target prompt's
    latent under the original model from the same noise (moved past it by ``negative_guidance`` as the
    final goal is). The early steps decide an image's layout and outline, so a goal on them steers the
    whole trajectory onto the target's instead of only its end (0: the final latent alone). Like
    ``intermediate_preservation`` it reads the reference trajectory the loss already runs."""
    negative_guidance: float = 0.0
    """Aim each concept prompt past its target, away from what the original model makes of it: goal =
    target + eta * (target - z0 of the concept prompt under the original model), ESD's negative
    guidance on the final latent (one more trajectory per concept prompt without gradients). 0: the
    target itself."""


@dataclass
class AdversarialConfig:
    """Adversarial mask training (``train.adversarial``): before each step, an attacker who holds the mask as
    it is finds conditioning that brings the concept back, and the step erases the concept from that
    conditioning instead of the plain prompt's (AdvUnlearn's scheme; ``erasekit.training.adversarial``)."""

    steps: int = 0
    """Adam steps of the inner attack per micro-step (0: off). Each costs one denoiser call with gradients
    on the concept rows at one denoising step."""
    lr: float = 0.1
    """Adam's step size on the text-encoder outputs."""


@dataclass
class TrainConfig:
    """Optimisation and life-cycle."""

    iterations: int = 200
    """Optimiser steps."""
    batch_size: int = 1
    """Concept prompts per process per micro-step."""
    preservation_batch_size: int | None = None
    """Preservation prompts per process per micro-step (default: ``batch_size``). The preservation
    prompts stand for everything else the model draws, so their share of a step is a knob of its own;
    fewer concept prompts and more preservation prompts keep a step's cost about the same (on the
    ShapesCanvas circle demo, 2 + 6 and 3 + 5 kept no more of the other objects than 4 + 4: docs/shapescanvas.md)."""
    gradient_accumulation: int = 1
    noise_pool: int = 0
    """The mask method: noise seeds per training prompt, reused in turn (0: a new seed for every sample).
    With a pool, the original model's trajectories of each batch of (prompt, seed) pairs -- the reference
    the mask loss compares against, about a third of an iteration -- are computed once and kept in
    memory, so once every pair has been drawn an iteration costs the masked model's forward and backward
    passes alone. For small models (the ShapesCanvas world): a large model's latents over a whole
    trajectory take gigabytes per hundred pairs."""
    gradient_checkpointing: bool = True
    """Recompute each denoising step in the backward pass, so memory stays that of one step whatever
    the number of steps. ``false`` keeps the whole trajectory's graph instead: it skips the recomputed
    forward passes (about a fifth of an iteration) for memory that grows with the steps; for small
    models (the ShapesCanvas world)."""
    lr_schedule: str = "constant"
    """Any diffusers ``get_scheduler`` name: constant, constant_with_warmup, linear, cosine, ..."""
    warmup_steps: int = 0
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 1
    trackers: list[str] = field(default_factory=lambda: ["csv"])
    """csv is built in; tensorboard / wandb when installed."""
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    """The mask method's inner attack (off by default)."""


@dataclass
class ConceptPruneConfig:
    """ConceptPrune (``method: concept-prune``): WANDA scores of the feed-forward neurons on concept vs base
    prompts over the first denoising steps; the skilled ones are pruned (defaults: the official code's)."""

    top_share: float = 0.01
    """Share of each layer's neurons selected per step (among those scoring higher on the concept)."""
    timesteps: int = 10
    """The first steps of the trajectory scored (all of them when it has fewer); the union is pruned."""
    base: str = "anchor"
    """The base prompts: ``anchor`` (each concept prompt's anchor prompt, same noise) or ``preservation``."""
    batch_size: int = 8
    """Prompts per forward pass while scoring."""
    seed: int = 0
    """Seed of the scoring noises."""


@dataclass
class EsdConfig:
    """ESD (Gandikota et al., ICCV 2023): fine-tune the denoiser so that the concept prompt predicts what the
    frozen original predicts *away* from the concept (negative guidance). Its length is ``train.iterations``
    (official: 200). Defaults: the new official SD code."""

    variant: str = "esd-x"
    """``esd-x``: the text-conditioning projections (cross-attention keys/values; on FLUX and SD3 the
    context embedder, pooled-text projection and the text stream's key/value projections); ``esd-u``: every
    other denoiser parameter (for global concepts such as a style or nudity); ``esd-all``: everything."""
    eta: float = 2.0
    """Negative guidance: target = neutral - eta * (concept - neutral), from the frozen model."""
    lr: float = 5e-5
    """Adam learning rate."""
    iterations: int | None = None
    """Optimiser steps (replaces ``train.iterations`` for this method; None: ``train.iterations``)."""
    batch_size: int | None = None
    """Training samples per process per micro-step (replaces ``train.batch_size``; None: that)."""
    start_guidance: float = 3.0
    """Classifier-free guidance (on guidance-distilled FLUX: the guidance input) of the frozen model when it
    samples the training latents x_t from noise to the random step."""


@dataclass
class EapConfig(EsdConfig):
    """Erasing with Adversarial Preservation (Bui et al., NeurIPS 2024): ESD's fine-tuning (the fields it
    shares with ``esd`` mean the same) plus the preservation of the concept the current edit damages most,
    searched by Gumbel-softmax logits over candidate concepts (the vocabulary tokens nearest the concept,
    reduced to K-means centres), alternating with the model's steps. Defaults: the official code's (nudity:
    ESD-u, lr 1e-5; its length, 1000 iterations, is ``train.iterations`` unless ``iterations`` is set)."""

    variant: str = "esd-u"
    """As ``esd.variant``; the official EAP runs train ``noxattn`` (everything but cross-attention): esd-u."""
    lr: float = 1e-5
    """Adam learning rate of the model (official)."""
    preservation_weight: float = 1.0
    """alpha in ESD + alpha * preservation (the preservation loss on the adversarial concept)."""
    adversary_lr: float = 1e-2
    """Adam learning rate of the Gumbel-softmax logits, which ascend the preservation loss (official)."""
    adversary_steps: int = 1
    """Ascent steps of the logits before each training sample's model loss."""
    temperature: float = 1.0
    """Gumbel-softmax temperature."""
    hard: bool = False
    """One-hot Gumbel samples (straight-through gradient) instead of soft mixtures of the candidates."""
    nearest: int = 1000
    """Vocabulary tokens nearest the concept (cosine, in the first text encoder's input embeddings) the
    candidates are drawn from (official: 1000-2000); at most the vocabulary less the excluded tokens."""
    centres: int = 50
    """K-means centres of those tokens; each centre's nearest token is one candidate concept (official 50-100)."""
    candidates: list[str] = field(default_factory=list)
    """Candidate concepts given as words, searched instead of the vocabulary's nearest tokens (for a model whose
    vocabulary is mostly word pieces); the concept's own words are left out either way."""


@dataclass
class AdvUnlearnConfig(EsdConfig):
    """AdvUnlearn (Zhang et al., NeurIPS 2024): ESD's fine-tuning (the fields it shares with ``esd`` mean the
    same) on conditioning an inner attack found against the model as it is, plus a retain loss on the
    preservation prompts. The official code trains the text encoder; erasekit trains the text-conditioning
    projections (``esd-x``), which the reference notes recommend for FLUX and SD3 and which keeps one
    parameter set for every text family."""

    eta: float = 1.0
    """As ``esd.eta``; AdvUnlearn's ESD loss uses negative guidance 1."""
    lr: float = 1e-5
    """Adam learning rate of the model (official; its length, 1000 iterations, is ``train.iterations``
    unless ``iterations`` is set)."""
    attack_steps: int = 30
    """Adam steps of the inner attack per training sample (official: 30)."""
    attack_lr: float = 1e-3
    """Adam's step size on the text-encoder outputs the attack moves (official: 1e-3, there on one prefix
    token's word embedding)."""
    retain_weight: float = 0.3
    """Weight of the retain loss: the trained model's prediction for a preservation prompt against the frozen
    model's at the same latent (official: 0.3, on COCO object prompts)."""


@dataclass
class CaConfig:
    """Concept ablation (Kumari et al., ICCV 2023), model-based: on noised images of the anchor, the
    concept prompt's prediction is pulled to the model's own anchor-prompt prediction (stop-gradient). Its
    length is ``train.iterations`` (official objects/styles: 100)."""

    parameters: str = "cross-attn"
    """``cross-attn``: the text-conditioning projections (default); ``attn``: every attention projection
    (the official choice for nudity); ``full-weight``: the whole denoiser."""
    lr: float = 1.6e-5
    """Adam learning rate: the official 2e-6 scaled as its ``scale_lr`` does (batch 4 on 2 GPUs)."""
    prior_weight: float = 0.0
    """Weight of the prior-preservation loss (the ordinary denoising loss on the anchor images with the
    anchor prompt); 0 switches it off (official objects/styles), official nudity uses it (1.0)."""
    iterations: int | None = None
    """Optimiser steps (replaces ``train.iterations`` for this method; None: ``train.iterations``)."""
    batch_size: int | None = None
    """Training samples per process per micro-step (replaces ``train.batch_size``; None: that)."""
    anchor_images: int = 8
    """Images of the anchor the original model generates before training (the official code generates
    them first too); each step noises one of them at a random step."""


@dataclass
class SLDConfig:
    """Safe Latent Diffusion (method ``sld``): inference-time safety guidance away from the concept.

    ``preset`` picks the paper's settings (weak, medium, strong, max); each other field, when set,
    overrides the preset's value of the same name.
    """

    preset: str = "medium"
    safety_concept: str = ""
    """The text the guidance steers away from (default: ``concept.concept``)."""
    sld_guidance_scale: float | None = None
    sld_warmup_steps: int | None = None
    sld_threshold: float | None = None
    sld_momentum_scale: float | None = None
    sld_mom_beta: float | None = None


@dataclass
class FlowEditConfig:
    """FlowEdit (method ``flowedit``): the model's own image of a prompt, edited along the flow from the
    prompt to its concept-free version (the concept and its synonyms replaced by the anchor)."""

    strength: float = 0.86
    """The share of the sampling steps the edit runs over, from the end (``n_max = round(strength * steps)``;
    FlowEdit's FLUX setting is 24 of 28 steps)."""
    n_min: int = 0
    """The last ``n_min`` steps sample the target prompt plainly."""
    n_avg: int = 1
    """Noise draws averaged per step."""
    source_guidance_scale: float | None = None
    """Classifier-free guidance of the source prompt's velocity (default: the generation's scale)."""
    target_guidance_scale: float | None = None
    """... and of the target prompt's (default: the generation's scale)."""


@dataclass
class EraseConfig:
    """Everything ``erasekit erase`` needs."""

    method: str = "mask"
    """The erasure method (``erasekit methods`` lists them); its settings are the section of that name."""
    model: ModelConfig = field(default_factory=ModelConfig)
    concept: ConceptConfig = field(default_factory=ConceptConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    uce: UCEConfig = field(default_factory=UCEConfig)
    concept_prune: ConceptPruneConfig = field(default_factory=ConceptPruneConfig)
    esd: EsdConfig = field(default_factory=EsdConfig)
    ca: CaConfig = field(default_factory=CaConfig)
    eap: EapConfig = field(default_factory=EapConfig)
    advunlearn: AdvUnlearnConfig = field(default_factory=AdvUnlearnConfig)
    sld: SLDConfig = field(default_factory=SLDConfig)
    flowedit: FlowEditConfig = field(default_factory=FlowEditConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("auto", "float32", "float16", "bfloat16"),
    "mask.parameterization": ("sigmoid", "hard_concrete", "binary"),
    "loss.distance": ("mse", "l1"),
    "sampling.scheduler": ("pipeline", "ddim", "euler", "dpm", "pndm", "flow-euler"),
    "concept_prune.base": ("anchor", "preservation"),
    "esd.variant": ("esd-x", "esd-u", "esd-all"),
    "eap.variant": ("esd-x", "esd-u", "esd-all"),
    "advunlearn.variant": ("esd-x", "esd-u", "esd-all"),
    "ca.parameters": ("cross-attn", "attn", "full-weight"),
    "sld.preset": ("weak", "medium", "strong", "max"),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


#: A number in exponent notation (``1e-3``, ``2.5E4``): YAML 1.2 reads it as a float, PyYAML (YAML 1.1, which
#: wants a dot and a signed exponent) as a string. Only these strings count as floats: a quoted "0.5" stays text.
_EXPONENT_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check_value(path: str, value: Any, tp: Any) -> Any:
    """Return ``value`` if it fits ``tp`` (ints and exponent-notation strings such as ``'1e-3'`` widen to
    floats), else raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(path, value, option)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list of {_type_name(item_tp)}, got {type(value).__name__} {value!r}")
        return [_check_value(f"{path}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            # every number of the schema is a weight, rate or threshold: NaN or infinity only fails later, mid-training
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        choices = CHOICES.get(path)
        if choices is not None and value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(choices)}")
        return value
    raise ConfigError(f"{path}: unsupported type {tp}")  # pragma: no cover - schema bug


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _merge(obj: Any, data: dict[str, Any], prefix: str) -> None:
    """Apply a nested mapping onto dataclass instance ``obj`` in place, strictly."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    types_ = _field_types(type(obj))
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in types_:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {', '.join(types_)}")
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            _merge(getattr(obj, key), value, path)
        else:
            setattr(obj, key, _check_value(path, value, tp))


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: EraseConfig | None = None
) -> EraseConfig:
    """Build an :class:`EraseConfig` from defaults, an optional YAML recipe, and ``key=value`` overrides.

    Override values are parsed as YAML scalars (``3``, ``0.5``, ``true``, ``[a, b]``, ``null``).
    ``base`` (left unchanged) replaces the defaults: what the recipe and the overrides leave out
    keeps its value there (the demo's world fills in its sampling settings this way).

    Raises:
        ConfigError: unknown key, wrong type, unreadable file.
    """
    config = copy.deepcopy(base) if base is not None else EraseConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"config file {str(path)!r} does not exist; pass a YAML recipe such as configs/flux-schnell.yaml"
            )
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {first}") from None
        _merge(config, data, "")
    for item in overrides or []:
        apply_override(config, item)
    return config


def apply_override(config: EraseConfig, item: str) -> None:
    """Apply one ``a.b.c=value`` override in place."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value, e.g. train.iterations=100")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    set_value(config, key.strip(), value)


def set_value(config: EraseConfig, key: str, value: Any) -> None:
    """Set the ``a.b.c`` key to ``value`` in place, checked as a recipe's value is.

    For values given as they are (a command-line ``--concept``): no YAML parsing, so any text,
    emoji included, arrives unchanged.
    """
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    _merge(config, nested, "")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (for YAML/JSON output)."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
