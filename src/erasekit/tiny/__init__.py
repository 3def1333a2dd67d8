"""Tiny, randomly initialised pipelines (and their offline tokenizers) for tests and examples.

One module per family; :data:`SAVERS` maps the ``erasekit tiny-model --family`` names to the
functions that build and save a tiny pipeline folder (``saver(path, seed=0) -> Path``).
"""

from collections.abc import Callable

from .dit import build_tiny_dit_pipeline, save_tiny_dit_pipeline
from .flux import (
    COMPONENT_SEED_OFFSETS,
    SPEC_FILE_NAME,
    TinyFluxSpec,
    build_tiny_flux_pipeline,
    save_tiny_flux_pipeline,
)
from .pixart import build_tiny_pixart_pipeline, save_tiny_pixart_pipeline
from .sd3 import build_tiny_sd3_pipeline, save_tiny_sd3_pipeline
from .tokenizers import build_clip_tokenizer, build_t5_tokenizer
from .unet import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline, save_tiny_sd_pipeline, save_tiny_sdxl_pipeline

SAVERS: dict[str, Callable[..., object]] = {
    "flux": save_tiny_flux_pipeline,
    "sd": save_tiny_sd_pipeline,
    "sdxl": save_tiny_sdxl_pipeline,
    "sd3": save_tiny_sd3_pipeline,
    "pixart": save_tiny_pixart_pipeline,
    "dit": save_tiny_dit_pipeline,
}

__all__ = [
    "COMPONENT_SEED_OFFSETS",
    "SAVERS",
    "SPEC_FILE_NAME",
    "TinyFluxSpec",
    "build_clip_tokenizer",
    "build_t5_tokenizer",
    "build_tiny_dit_pipeline",
    "build_tiny_flux_pipeline",
    "build_tiny_pixart_pipeline",
    "build_tiny_sd3_pipeline",
    "build_tiny_sd_pipeline",
    "build_tiny_sdxl_pipeline",
    "save_tiny_dit_pipeline",
    "save_tiny_flux_pipeline",
    "save_tiny_pixart_pipeline",
    "save_tiny_sd3_pipeline",
    "save_tiny_sd_pipeline",
    "save_tiny_sdxl_pipeline",
]
