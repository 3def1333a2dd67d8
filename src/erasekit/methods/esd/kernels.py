"""Erased Stable Diffusion (ESD, Gandikota et al., "Erasing Concepts from Diffusion Models", ICCV 2023): the
target, the loss and the parameter sets, model-independent.

The model being trained, ``ε_θ``, is pulled towards a target built by a *frozen copy* ``ε*`` of the original
model at a noised latent ``x_t``:

    target = ε*(x_t, ∅, t) − η (ε*(x_t, c, t) − ε*(x_t, ∅, t)) = (1 + η) ε*(x_t, ∅, t) − η ε*(x_t, c, t)
    loss   = MSE(ε_θ(x_t, c, t), target)

The weights sum to one, so the target is the same affine combination in any parameterisation (noise,
velocity, x̂0): flow-matching families use velocities directly. On guidance-distilled FLUX there is no
unconditional branch, so ``∅`` is the empty (or a neutral) *prompt* predicted conditionally at the same
guidance embedding — :func:`esd_target_from_model` does exactly that with two calls of a predictor.

Parameter sets (official code): ``esd-x`` trains the text-conditioning projections (cross-attention),
``esd-u`` everything else, ``esd-all`` everything. Which modules are text-conditioning is the architecture's
business: the selection takes a predicate over module names.

Defaults (new official SD code): 200 iterations, Adam lr 5e-5, η = 2, start guidance 3.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from erasekit.errors import ConfigError

#: η, the negative guidance of the target (new official SD code).
ESD_DEFAULT_ETA = 2.0
#: Adam learning rate (new official SD code).
ESD_DEFAULT_LR = 5e-5
#: Training iterations (new official SD code).
ESD_DEFAULT_ITERATIONS = 200
#: Classifier-free guidance of the frozen model when it samples the training latents.
ESD_DEFAULT_START_GUIDANCE = 3.0
#: The parameter sets :func:`esd_parameters` selects.
ESD_VARIANTS = ("esd-x", "esd-u", "esd-all")

#: ``predict(x_t, t, conditioning) -> prediction`` (noise or velocity); ``conditioning`` is whatever the
#: family's denoiser takes (an embedding tensor, a dict of them).
Predictor = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def esd_target(neutral: torch.Tensor, concept: torch.Tensor, eta: float = ESD_DEFAULT_ETA) -> torch.Tensor:
    """``neutral − η (concept − neutral)``: the ESD target from the frozen model's two predictions.

    Args:
        neutral: ``ε*(x_t, ∅, t)`` — unconditional, or the empty prompt's conditional prediction on
            guidance-distilled models.
        concept: ``ε*(x_t, c, t)``.
        eta: the negative guidance η (0 makes the target the neutral prediction).
    """
    if neutral.shape != concept.shape:
        raise ValueError(f"predictions differ in shape: {tuple(neutral.shape)} vs {tuple(concept.shape)}")
    return neutral - eta * (concept - neutral)


def esd_target_from_model(
    frozen: Predictor,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    concept: Any,
    neutral: Any,
    eta: float = ESD_DEFAULT_ETA,
) -> torch.Tensor:
    """The ESD target from two conditional predictions of the frozen copy, without autograd.

    This is the guidance-distilled (FLUX) form and also the CFG form (an "unconditional" prediction is
    the empty prompt's conditioning). ``frozen`` must be the frozen copy, never the model being trained
    (EraseAnything's port computes the targets with the adapted model, which moves the target as it
    trains); the predictions run under :func:`torch.no_grad` and the target is detached either way.
    """
    with torch.no_grad():
        target = esd_target(frozen(latents, timestep, neutral), frozen(latents, timestep, concept), eta)
    return target.detach()


def esd_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``MSE(ε_θ(x_t, c, t), target)``, the mean over all elements.

    Raises:
        ValueError: ``target`` carries a gradient (it was not built by the frozen copy under no_grad).
    """
    if target.requires_grad:
        raise ValueError("the ESD target must come from the frozen copy without gradient (esd_target_from_model)")
    return F.mse_loss(prediction, target)


def module_name_predicate(names: Iterable[str]) -> Callable[[str], bool]:
    """A predicate true for the named modules and everything inside them (``name`` or ``name.…``).

    Architecture accessors give module names (e.g. every ``attn2.to_k``); this turns them into the
    predicate :func:`esd_parameters` takes.
    """
    wanted = frozenset(names)

    def matches(module_name: str) -> bool:
        parts = module_name.split(".")
        return any(".".join(parts[:i]) in wanted for i in range(1, len(parts) + 1))

    return matches


def select_parameters(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]], predicate: Callable[[str], bool]
) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters whose *module* name (the parameter name minus its last part) satisfies ``predicate``."""
    return [(name, p) for name, p in named_parameters if predicate(name.rpartition(".")[0])]


def esd_parameters(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    is_text_conditioning: Callable[[str], bool],
    variant: str = "esd-x",
) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters ESD trains.

    Args:
        named_parameters: the denoiser's ``named_parameters()``.
        is_text_conditioning: true for the module names of the text-conditioning projections (cross-attention
            on UNets/PixArt; on FLUX/SD3 the context embedder, pooled-text projection and ``add_k/v_proj``).
        variant: ``esd-x`` (those modules), ``esd-u`` (all other modules) or ``esd-all``.

    Raises:
        ConfigError: an unknown variant, or a selection that is empty (the official README's method names
            select nothing and the optimiser then fails far from the cause).
    """
    if variant not in ESD_VARIANTS:
        raise ConfigError(f"unknown ESD variant {variant!r}; choose one of {', '.join(ESD_VARIANTS)}")
    if variant == "esd-x":
        predicate = is_text_conditioning
    elif variant == "esd-u":
        predicate = lambda module: not is_text_conditioning(module)  # noqa: E731
    else:
        predicate = lambda module: True  # noqa: E731
    selected = select_parameters(named_parameters, predicate)
    if not selected:
        raise ConfigError(f"ESD variant {variant!r} selects no parameters of this model")
    return selected
