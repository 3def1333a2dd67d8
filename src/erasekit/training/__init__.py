"""Trajectory gradients and the mask trainer."""

from .gradient import checkpointed_gradient, naive_gradient, two_call_gradient
from .trainer import MaskTrainer, TrainResult, erase, make_accelerator

__all__ = [
    "MaskTrainer",
    "TrainResult",
    "checkpointed_gradient",
    "erase",
    "make_accelerator",
    "naive_gradient",
    "two_call_gradient",
]
