"""Attacks that test an erasure (``soft-prompt``, ``p4d``, ``unlearndiffatk``, ``completion``,
``ring-a-bell``, ``ring-a-bell-embedding``, ``textual-inversion``), their registry and result type.

Importing the package registers every attack; :func:`run_attack` is the library call behind
``erasekit attack``.
"""

from __future__ import annotations

from . import completion, p4d, ring_a_bell, soft_prompt, textual_inversion, unlearndiffatk  # noqa: F401  (registers the attacks)
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
from .p4d import P4DAttack
from .ring_a_bell import (
    RingABell,
    RingABellConfig,
    RingABellEmbedding,
    RingABellEmbeddingConfig,
    concept_vector,
    genetic_search,
)
from .soft_prompt import SoftPromptAttack, SoftPromptConfig
from .textual_inversion import TextualInversion, TextualInversionConfig
from .tokens import TokenAttackConfig
from .unlearndiffatk import UnlearnDiffAtk, UnlearnDiffAtkConfig

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
    "P4DAttack",
    "RingABell",
    "RingABellConfig",
    "RingABellEmbedding",
    "RingABellEmbeddingConfig",
    "Sampling",
    "SeedResult",
    "SoftPromptAttack",
    "SoftPromptConfig",
    "TextualInversion",
    "TextualInversionConfig",
    "TokenAttackConfig",
    "UnlearnDiffAtk",
    "UnlearnDiffAtkConfig",
    "attack_names",
    "concept_vector",
    "detector_judge",
    "genetic_search",
    "get_attack",
    "register_attack",
    "run_attack",
    "save_attack_result",
]
