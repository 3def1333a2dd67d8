"""Attacks that test an erasure (``soft-prompt``, ``completion``), their registry and result type.

Importing the package registers every attack; :func:`run_attack` is the library call behind
``erasekit attack``.
"""

from __future__ import annotations

from . import completion, soft_prompt  # noqa: F401  (registers the attacks)
from .base import (
    Attack,
    AttackConfig,
    AttackResult,
    DetectorJudge,
    Erasure,
    ErasureHandle,
    Judge,
    Sampling,
    SeedResult,
    attack_names,
    detector_judge,
    get_attack,
    register_attack,
    run_attack,
    save_attack_result,
)
from .completion import CompletionConfig, CompletionProbe
from .soft_prompt import SoftPromptAttack, SoftPromptConfig

__all__ = [
    "Attack",
    "AttackConfig",
    "AttackResult",
    "CompletionConfig",
    "CompletionProbe",
    "DetectorJudge",
    "Erasure",
    "ErasureHandle",
    "Judge",
    "Sampling",
    "SeedResult",
    "SoftPromptAttack",
    "SoftPromptConfig",
    "attack_names",
    "detector_judge",
    "get_attack",
    "register_attack",
    "run_attack",
    "save_attack_result",
]
