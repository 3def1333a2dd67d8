"""Erasure methods behind one interface (:mod:`erasekit.methods.base`), registered by name.

Importing this package registers every method that ships with erasekit (one import line each below).
"""

from . import (
    advunlearn,  # noqa: F401  (registers "advunlearn")
    ca,  # noqa: F401  (registers "ca")
    concept_prune,  # noqa: F401  (registers "concept-prune")
    eap,  # noqa: F401  (registers "eap")
    esd,  # noqa: F401  (registers "esd")
    flowedit,  # noqa: F401  (registers "flowedit")
    mask,  # noqa: F401  (registers "mask")
    sld,  # noqa: F401  (registers "sld")
    uce,  # noqa: F401  (registers "uce")
)
from .base import (
    FORMAT,
    FORMAT_VERSION,
    RECORD_NAME,
    Cost,
    Erasure,
    ErasureHandle,
    Method,
    apply_erasures,
    available_methods,
    erase,
    fold_erasures,
    get_method,
    load_erasure,
    register_method,
    save_folded_pipeline,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "RECORD_NAME",
    "Cost",
    "Erasure",
    "ErasureHandle",
    "Method",
    "apply_erasures",
    "available_methods",
    "erase",
    "fold_erasures",
    "get_method",
    "load_erasure",
    "register_method",
    "save_folded_pipeline",
]
