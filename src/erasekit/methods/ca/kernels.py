"""Concept Ablation (CA, Kumari et al., "Ablating Concepts in Text-to-Image Diffusion Models", ICCV 2023),
model-based variant: the loss and the parameter groups, model-independent.

On a latent ``x_t`` noised from an image of the *anchor* (e.g. "a dog" for "Grumpy Cat"), the model's
prediction for the concept prompt is pulled to its own prediction for the anchor prompt, held fixed:

    loss = ||ε_θ(x_t, c_concept, t) − sg(ε_θ(x_t, c_anchor, t))||²   (averaged inside an optional mask)
         + w_prior · ||ε_θ(x'_t, c_anchor, t) − ε||²                  (optional prior preservation)

The stop-gradient target comes from the *same* model being trained (unlike ESD's frozen copy). The prior
term is the ordinary denoising loss on anchor images ``x'`` with their noise ``ε``.

Parameter groups (official code): ``cross-attn`` (text-conditioning K/V, the default), ``attn`` (every
attention projection; used for nudity), ``full-weight``, ``embedding`` (the text encoder's token
embeddings). Defaults (README): objects/styles lr 2e-6 (× batch scaling), 100 steps, batch 4; nudity
lr 4e-6, 400 steps, ``attn`` and the prior loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from erasekit.errors import ConfigError
from erasekit.methods.esd.kernels import Predictor, select_parameters

#: Parameter groups of :func:`ca_parameters`; the first is the default.
CA_PARAMETER_GROUPS = ("cross-attn", "attn", "full-weight", "embedding")
#: Learning rate for objects and styles (README; the official code scales it by the batch size).
CA_DEFAULT_LR = 2e-6
#: Training steps for objects and styles (README).
CA_DEFAULT_STEPS = 100


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error averaged per sample over the mask's weight, then over the batch.

    Args:
        prediction, target: ``(batch, …)``.
        mask: broadcastable to ``prediction``, non-negative weights (1 where the image is, 0 on padding);
            None weighs every element alike (plain MSE).
    """
    squared = (prediction - target) ** 2
    if mask is None:
        return squared.mean()
    weights = mask.to(squared.dtype).expand_as(squared)
    dims = tuple(range(1, squared.dim()))
    return ((squared * weights).sum(dims) / weights.sum(dims).clamp(min=1e-12)).mean()


def ca_loss(
    prediction: torch.Tensor,
    anchor_prediction: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    prior_prediction: torch.Tensor | None = None,
    prior_noise: torch.Tensor | None = None,
    prior_weight: float = 1.0,
) -> torch.Tensor:
    """The model-based concept-ablation loss (see the module docstring).

    Args:
        prediction: ``ε_θ(x_t, c_concept, t)``, with gradient.
        anchor_prediction: ``ε_θ(x_t, c_anchor, t)``; it is detached here (the stop-gradient), whether or not
            the caller already did so.
        mask: optional weights for the ablation term (:func:`masked_mse`).
        prior_prediction, prior_noise: both or neither: ``ε_θ(x'_t, c_anchor, t)`` and the noise ``ε`` that
            noised the anchor image ``x'``.
        prior_weight: ``w_prior``.

    Raises:
        ValueError: only one of the prior tensors is given.
    """
    loss = masked_mse(prediction, anchor_prediction.detach(), mask)
    if (prior_prediction is None) != (prior_noise is None):
        raise ValueError("give both prior_prediction and prior_noise, or neither")
    if prior_prediction is not None and prior_noise is not None:
        loss = loss + prior_weight * F.mse_loss(prior_prediction, prior_noise)
    return loss


def ca_loss_from_model(
    model: Predictor,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    concept: Any,
    anchor: Any,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`ca_loss` with both predictions from the model being trained, the anchor's under no_grad
    (the stop-gradient saves its graph's memory too)."""
    with torch.no_grad():
        anchor_prediction = model(latents, timestep, anchor)
    return ca_loss(model(latents, timestep, concept), anchor_prediction, mask)


def ca_parameters(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    group: str = "cross-attn",
    *,
    is_text_conditioning: Callable[[str], bool],
    is_attention: Callable[[str], bool] | None = None,
    is_embedding: Callable[[str], bool] | None = None,
) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters CA trains in ``group``, chosen by predicates over module names.

    Args:
        named_parameters: the trainable model's ``named_parameters()`` (the denoiser; the text encoder for
            ``embedding``).
        group: one of :data:`CA_PARAMETER_GROUPS`.
        is_text_conditioning: module names of the text-conditioning K/V projections (``cross-attn``).
        is_attention: module names of every attention projection (``attn``).
        is_embedding: module names of the token embeddings (``embedding``).

    Raises:
        ConfigError: an unknown group, a group whose predicate was not given, or an empty selection.
    """
    if group not in CA_PARAMETER_GROUPS:
        raise ConfigError(f"unknown CA parameter group {group!r}; choose one of {', '.join(CA_PARAMETER_GROUPS)}")
    predicates: dict[str, Callable[[str], bool] | None] = {
        "cross-attn": is_text_conditioning,
        "attn": is_attention,
        "full-weight": lambda module: True,
        "embedding": is_embedding,
    }
    predicate = predicates[group]
    if predicate is None:
        raise ConfigError(f"CA parameter group {group!r} is not available for this model")
    selected = select_parameters(named_parameters, predicate)
    if not selected:
        raise ConfigError(f"CA parameter group {group!r} selects no parameters of this model")
    return selected
