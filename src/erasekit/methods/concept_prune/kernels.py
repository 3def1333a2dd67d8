"""ConceptPrune (Chavhan et al., "ConceptPrune: Concept Editing in Diffusion Models via Skilled Neuron
Pruning", 2024): training-free selection of feed-forward units by WANDA scores, model-independent.

WANDA (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", 2023) scores each
weight of a linear layer ``y = W x`` by its magnitude times the norm of its input feature over all tokens
seen:

    S_ij = |W_ij| · ||X_j||_2

ConceptPrune scores the feed-forward *output* projection (UNet ``ff.net.2``; FLUX ``ff.net.2`` and
``ff_context.net.2``) — its input features are the feed-forward hidden neurons — once on concept prompts and
once on paired base prompts, separately at each of the first τ denoising steps. At every step, the
"skilled" weights are the top share of each row by concept score among those whose concept score beats the
base score; the union over the steps is pruned (zeroed).

erasekit masks units, not single weights, so :func:`skilled_neurons` applies the same rule to hidden
neurons: a neuron's score is the sum of its column's WANDA scores, ``||X_j|| · Σ_i |W_ij|``, and the top
share of the neurons (among those above their base score) is chosen per step, the union over steps pruned.
:func:`skilled_weights` gives the official weight-level selection.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType

import torch
from torch import nn

from erasekit.errors import ConfigError

#: The share selected per step (the official code prunes the top 1 % of each row).
CONCEPT_PRUNE_DEFAULT_SHARE = 0.01


class InputNormRecorder:
    """Accumulates ``Σ x_j²`` over every token that enters each watched linear layer, per input feature.

    Use as a context manager around the forward passes of one step and prompt set; :meth:`norms` gives
    ``||X_j||_2`` per layer, :meth:`reset` starts the next step. Hooks are removed on exit.

    Args:
        modules: name -> linear layer whose inputs are recorded.
    """

    def __init__(self, modules: Mapping[str, nn.Linear]) -> None:
        self.modules = dict(modules)
        self.squared: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _record(self, name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        """A forward pre-hook adding the squared inputs of layer ``name``."""

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            features = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            total = (features**2).sum(0)
            self.squared[name] = self.squared[name] + total if name in self.squared else total

        return hook

    def __enter__(self) -> InputNormRecorder:
        self._handles = [m.register_forward_pre_hook(self._record(n)) for n, m in self.modules.items()]
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def norms(self) -> dict[str, torch.Tensor]:
        """``||X_j||_2`` per recorded layer (float64); layers that saw no input are absent."""
        return {name: squared.sqrt() for name, squared in self.squared.items()}

    def reset(self) -> None:
        """Forget what was recorded (the next step starts)."""
        self.squared = {}


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """``S_ij = |W_ij| · ||X_j||``, shape of ``weight`` ``(out_features, in_features)``."""
    if input_norms.shape != weight.shape[1:]:
        raise ValueError(f"input norms of shape {tuple(input_norms.shape)} do not fit weight {tuple(weight.shape)}")
    return weight.detach().abs().to(input_norms.dtype) * input_norms.unsqueeze(0)


def neuron_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """Per input neuron, the sum of its column's WANDA scores: ``||X_j|| · Σ_i |W_ij|``, shape ``(in_features,)``."""
    return wanda_scores(weight, input_norms).sum(0)


def _top_among(scores: torch.Tensor, eligible: torch.Tensor, share: float) -> torch.Tensor:
    """Boolean mask, along the last dimension, of the ``ceil(share · n)`` highest ``scores`` that are eligible."""
    count = math.ceil(share * scores.shape[-1])
    if count == 0:
        return torch.zeros_like(eligible)
    ranked = torch.where(eligible, scores, torch.full_like(scores, -math.inf))
    chosen = torch.zeros_like(eligible)
    chosen.scatter_(-1, ranked.topk(count, dim=-1).indices, True)
    # topk fills up with ineligible entries when fewer than `count` are eligible: drop them.
    return chosen & eligible


def _keep_mask(
    concept_scores: Sequence[torch.Tensor], base_scores: Sequence[torch.Tensor], share: float
) -> torch.Tensor:
    """False where an entry is among the top ``share`` of its last dimension (above base) at any step."""
    if len(concept_scores) != len(base_scores) or len(concept_scores) == 0:
        raise ValueError(
            f"need the same number (>= 1) of concept and base steps, got {len(concept_scores)} and {len(base_scores)}"
        )
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"the ConceptPrune share must be in [0, 1], got {share}")
    pruned = torch.zeros(concept_scores[0].shape, dtype=torch.bool, device=concept_scores[0].device)
    for concept, base in zip(concept_scores, base_scores):
        if concept.shape != pruned.shape or base.shape != pruned.shape:
            raise ValueError(f"scores of every step must have shape {tuple(pruned.shape)}")
        pruned |= _top_among(concept, concept > base, share)
    return ~pruned


def skilled_neurons(
    concept_scores: Sequence[torch.Tensor],
    base_scores: Sequence[torch.Tensor],
    top_share: float = CONCEPT_PRUNE_DEFAULT_SHARE,
) -> torch.Tensor:
    """The keep mask over neurons: False for the skilled neurons of any step.

    Args:
        concept_scores: per step, ``(n_neurons,)`` scores on the concept prompts (:func:`neuron_scores`).
        base_scores: per step, the same on the base prompts.
        top_share: the share of all neurons selected per step (among those above their base score).

    Returns:
        Boolean ``(n_neurons,)``, True = keep.
    """
    return _keep_mask(concept_scores, base_scores, top_share)


def skilled_weights(
    concept_scores: Sequence[torch.Tensor],
    base_scores: Sequence[torch.Tensor],
    top_share: float = CONCEPT_PRUNE_DEFAULT_SHARE,
) -> torch.Tensor:
    """The official weight-level keep mask: per step and per row, the top share of the row's weights by concept
    WANDA score among those above their base score are skilled; False for the union over steps.

    Args:
        concept_scores, base_scores: per step, ``(out_features, in_features)`` (:func:`wanda_scores`).
        top_share: the share of each row selected per step.
    """
    return _keep_mask(concept_scores, base_scores, top_share)
