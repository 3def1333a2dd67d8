"""Attacks that test an erasure (``soft-prompt``, ``completion``, ``ring-a-bell``, ``ring-a-bell-embedding``),
their registry and result type.

Importing the package registers every attack; :func:`run_attack` is the library call behind
``erasekit attack``.
"""

from __future__ import annotations

from . import completion, ring_a_bell, soft_prompt  # noqa: F401  (registers the attacks)
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
from .ring_a_bell import (
    RingABell,
    RingABellConfig,
    RingABellEmbedding,
    RingABellEmbeddingConfig,
    concept_vector,
    genetic_search,
)
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
    "RingABell",
    "RingABellConfig",
    "RingABellEmbedding",
    "RingABellEmbeddingConfig",
    "Sampling",
    "SeedResult",
    "SoftPromptAttack",
    "SoftPromptConfig",
    "attack_names",
    "concept_vector",
    "detector_judge",
    "genetic_search",
    "get_attack",
    "register_attack",
    "run_attack",
    "save_attack_result",
]
