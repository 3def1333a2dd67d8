"""What iterative erasure methods share: trajectory gradients and the training run's life-cycle."""

from .gradient import checkpointed_gradient, naive_gradient, two_call_gradient
from .run import CHECKPOINTS, PromptEncoder, TrainingRun, make_accelerator, staging_path

__all__ = [
    "CHECKPOINTS",
    "PromptEncoder",
    "TrainingRun",
    "checkpointed_gradient",
    "make_accelerator",
    "naive_gradient",
    "staging_path",
    "two_call_gradient",
]
