"""Unified Concept Editing (UCE, Gandikota et al., WACV 2024): a closed-form edit of text-conditioning projections."""

from erasekit.methods.uce.kernels import (
    UCE_DEFAULT_ERASE_SCALE,
    UCE_DEFAULT_LAMBDA,
    UCE_DEFAULT_PRESERVE_SCALE,
    UCEStatistics,
    last_word_token_index,
    uce_edit,
    uce_solve,
    uce_statistics,
    uce_targets,
)
from erasekit.methods.uce.method import UCEErasure, UCEMethod

__all__ = [
    "UCE_DEFAULT_ERASE_SCALE",
    "UCE_DEFAULT_LAMBDA",
    "UCE_DEFAULT_PRESERVE_SCALE",
    "UCEErasure",
    "UCEMethod",
    "UCEStatistics",
    "last_word_token_index",
    "uce_edit",
    "uce_solve",
    "uce_statistics",
    "uce_targets",
]
