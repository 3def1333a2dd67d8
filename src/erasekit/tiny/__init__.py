"""Tiny, randomly initialised pipelines (and their offline tokenizers) for tests and examples."""

from .flux import (
    COMPONENT_SEED_OFFSETS,
    SPEC_FILE_NAME,
    TinyFluxSpec,
    build_tiny_flux_pipeline,
    save_tiny_flux_pipeline,
)
from .tokenizers import build_clip_tokenizer, build_t5_tokenizer

__all__ = [
    "COMPONENT_SEED_OFFSETS",
    "SPEC_FILE_NAME",
    "TinyFluxSpec",
    "build_clip_tokenizer",
    "build_t5_tokenizer",
    "build_tiny_flux_pipeline",
    "save_tiny_flux_pipeline",
]
