"""ConceptPrune (Chavhan et al., 2024): training-free pruning of skilled feed-forward neurons by WANDA scores
(registered as the method ``concept-prune``)."""

from erasekit.methods.concept_prune.kernels import (
    CONCEPT_PRUNE_DEFAULT_SHARE,
    InputNormRecorder,
    neuron_scores,
    skilled_neurons,
    skilled_weights,
    wanda_scores,
)
from erasekit.methods.concept_prune.method import ConceptPruneErasure, ConceptPruneMethod

__all__ = [
    "CONCEPT_PRUNE_DEFAULT_SHARE",
    "ConceptPruneErasure",
    "ConceptPruneMethod",
    "InputNormRecorder",
    "neuron_scores",
    "skilled_neurons",
    "skilled_weights",
    "wanda_scores",
]
