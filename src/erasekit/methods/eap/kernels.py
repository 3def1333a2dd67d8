"""Erasing with Adversarial Preservation (EAP, Bui et al., "Erasing Undesirable Concepts in Diffusion Models
with Adversarial Preservation", NeurIPS 2024): the search space, the Gumbel-softmax choice and the losses,
model-independent.

EAP trains like ESD but also preserves the concept that the erasure damages most. That concept is searched
in the text-embedding space: a candidate matrix ``E`` (K-means centres of the vocabulary tokens nearest the
erased concept; official: 50–100 centres of the 1000–2000 nearest tokens) and logits ``w`` over its rows
give

    c_r = GumbelSoftmax(w, τ) · E

and the losses are, with ``x̂0`` the model's estimate of the clean latent (the official losses live in x̂0
space; for velocity models ``x̂0 = x_t − σ v``):

    preservation = MSE(x̂0_θ(x_t, c_r), x̂0_*(x_t, c_r))          (trained model vs the frozen original)
    model step:     minimise  ESD + α · preservation   over θ
    adversary step: maximise  preservation               over w (official lr 1e-2), alternating

The frozen branch carries no trainable parameters, but its prediction depends on ``w`` through ``c_r``, so
it must *not* be detached in the adversary step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from erasekit.errors import ConfigError

#: The adversary's learning rate on the Gumbel logits (official).
EAP_DEFAULT_ADVERSARY_LR = 1e-2
#: The model's learning rate and iterations (official nudity setting, ESD-u style parameters).
EAP_DEFAULT_LR = 1e-5
EAP_DEFAULT_ITERATIONS = 1000
#: Vocabulary tokens nearest the concept, and the K-means centres made of them (official ranges: 1000–2000
#: and 50–100).
EAP_DEFAULT_NEAREST = 1000
EAP_DEFAULT_CENTRES = 50


def nearest_tokens(
    concept_embedding: torch.Tensor,
    vocabulary: torch.Tensor,
    k: int,
    *,
    metric: str = "cosine",
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of the ``k`` vocabulary rows nearest ``concept_embedding``, nearest first.

    Args:
        concept_embedding: ``(dim,)``, e.g. the mean of the concept's token embeddings.
        vocabulary: ``(vocab_size, dim)``, the text encoder's token-embedding matrix.
        k: how many.
        metric: ``cosine`` (highest similarity) or ``l2`` (smallest distance).
        exclude: indices never returned (the concept's own tokens).

    Raises:
        ConfigError: an unknown metric, or ``k`` out of range.
    """
    if metric not in ("cosine", "l2"):
        raise ConfigError(f"unknown metric {metric!r}; choose cosine or l2")
    if concept_embedding.shape != vocabulary.shape[1:]:
        raise ValueError(
            f"embedding {tuple(concept_embedding.shape)} does not fit vocabulary {tuple(vocabulary.shape)}"
        )
    vocabulary = vocabulary.detach().float()
    concept = concept_embedding.detach().float()
    if metric == "cosine":
        closeness = F.cosine_similarity(vocabulary, concept.unsqueeze(0), dim=1)
    else:
        closeness = -(vocabulary - concept).norm(dim=1)
    if exclude is not None:
        closeness[exclude] = -math.inf
    available = vocabulary.shape[0] - (0 if exclude is None else int(exclude.unique().numel()))
    if not 1 <= k <= available:
        raise ConfigError(f"k must be between 1 and {available} (the candidate tokens), got {k}")
    return closeness.topk(k).indices


def kmeans_centres(
    points: torch.Tensor, k: int, *, iterations: int = 25, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``k`` K-means centres of ``points`` ``(n, dim)`` by Lloyd's iterations from ``k`` distinct random points.

    A centre that loses all its points keeps its position (rather than becoming NaN).
    """
    if not 1 <= k <= points.shape[0]:
        raise ConfigError(f"k must be between 1 and {points.shape[0]} (the points), got {k}")
    points = points.detach().float()
    centres = points[torch.randperm(points.shape[0], generator=generator)[:k]].clone()
    for _ in range(iterations):
        assignment = torch.cdist(points, centres).argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=k).unsqueeze(1).to(points.dtype)
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
        if torch.equal(updated, centres):
            break
        centres = updated
    return centres


def eap_candidates(
    concept_embedding: torch.Tensor,
    vocabulary: torch.Tensor,
    *,
    nearest: int = EAP_DEFAULT_NEAREST,
    centres: int = EAP_DEFAULT_CENTRES,
    exclude: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The candidate matrix ``E``: K-means centres of the ``nearest`` vocabulary tokens nearest the concept
    (cosine), ``(centres, dim)``. The search stays near the concept (the concepts an erasure damages most)
    and the centres keep it small."""
    indices = nearest_tokens(concept_embedding, vocabulary, nearest, exclude=exclude)
    return kmeans_centres(vocabulary[indices], centres, generator=generator)


def gumbel_softmax(
    logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    hard: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A Gumbel-softmax sample over the last dimension (Jang et al. 2017; Maddison et al. 2017).

    ``softmax((w + g) / τ)`` with ``g = −log(−log u)``, ``u ~ U(0, 1)``. With ``hard`` the value is the one-hot
    argmax and the gradient that of the soft sample (straight-through). ``generator`` makes draws
    reproducible (:func:`torch.nn.functional.gumbel_softmax` takes none).
    """
    if not temperature > 0:
        raise ConfigError(f"the Gumbel-softmax temperature must be > 0, got {temperature}")
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    # Keep u away from 0 and 1 so that the double log stays finite.
    tiny = torch.finfo(logits.dtype).tiny
    gumbel = -torch.log(-torch.log(uniform.clamp(min=tiny, max=1.0 - torch.finfo(logits.dtype).eps)))
    soft = torch.softmax((logits + gumbel) / temperature, dim=-1)
    if not hard:
        return soft
    one_hot = F.one_hot(soft.argmax(dim=-1), soft.shape[-1]).to(soft.dtype)
    return one_hot - soft.detach() + soft


def adversarial_embedding(weights: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``c_r = weights · E``: ``(…, k) @ (k, dim) -> (…, dim)``."""
    return weights @ candidates


def x0_from_velocity(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``x̂0 = x_t − σ v`` for rectified flow ``x_t = (1 − σ) x0 + σ ε``, ``v = ε − x0``."""
    return latents - sigma * velocity


def x0_from_epsilon(latents: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """``x̂0 = (x_t − √(1 − ᾱ) ε̂) / √ᾱ`` for ``x_t = √ᾱ x0 + √(1 − ᾱ) ε``."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=latents.dtype, device=latents.device)
    return (latents - (1 - alpha_bar).sqrt() * noise) / alpha_bar.sqrt()


def preservation_loss(prediction: torch.Tensor, frozen_prediction: torch.Tensor) -> torch.Tensor:
    """``MSE(x̂0_θ(x_t, c_r), x̂0_*(x_t, c_r))``; not detached (the adversary's gradient flows through both)."""
    return F.mse_loss(prediction, frozen_prediction)


def eap_losses(
    esd: torch.Tensor, preservation: torch.Tensor, preservation_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two objectives EAP alternates: ``(model_loss, adversary_loss)``.

    ``model_loss = esd + α · preservation`` (minimised over the model), ``adversary_loss = −preservation``
    (minimised over the Gumbel logits, i.e. preservation ascended).
    """
    if preservation_weight < 0:
        raise ConfigError(f"the EAP preservation weight must be >= 0, got {preservation_weight}")
    return esd + preservation_weight * preservation, -preservation
