"""Erasing with Adversarial Preservation (EAP, Bui et al., NeurIPS 2024): ESD plus a Gumbel-softmax search for
the concept to preserve."""

from erasekit.methods.eap.kernels import (
    EAP_DEFAULT_ADVERSARY_LR,
    EAP_DEFAULT_CENTRES,
    EAP_DEFAULT_ITERATIONS,
    EAP_DEFAULT_LR,
    EAP_DEFAULT_NEAREST,
    adversarial_embedding,
    eap_candidates,
    eap_losses,
    gumbel_softmax,
    kmeans_centres,
    nearest_tokens,
    preservation_loss,
    x0_from_epsilon,
    x0_from_velocity,
)
from erasekit.methods.eap.method import EapErasure, EapMethod, EapTrainer

__all__ = [
    "EapErasure",
    "EapMethod",
    "EapTrainer",
    "EAP_DEFAULT_ADVERSARY_LR",
    "EAP_DEFAULT_CENTRES",
    "EAP_DEFAULT_ITERATIONS",
    "EAP_DEFAULT_LR",
    "EAP_DEFAULT_NEAREST",
    "adversarial_embedding",
    "eap_candidates",
    "eap_losses",
    "gumbel_softmax",
    "kmeans_centres",
    "nearest_tokens",
    "preservation_loss",
    "x0_from_epsilon",
    "x0_from_velocity",
]
