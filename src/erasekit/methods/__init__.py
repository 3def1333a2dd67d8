"""Erasure methods behind one interface (:mod:`erasekit.methods.base`), registered by name.

Importing this package registers every method that ships with erasekit (one import line each below).
"""

from . import (  # noqa: F401  (each import registers its method)
    flowedit,
    mask,
    sld,
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
