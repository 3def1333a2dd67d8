"""Tiny, randomly initialised PixArt-α / PixArt-Σ pipelines for tests and examples.

The pipeline has the real PixArt architecture (``PixArtTransformer2DModel`` with self- and
cross-attention blocks, the shared ``AdaLayerNormSingle`` timestep embedder, a T5-style text
encoder, ``AutoencoderKL``, ``DPMSolverMultistepScheduler`` configured like PixArt's) but tiny sizes,
so it builds in about a second. Weights are random; nothing is downloaded; everything is
deterministic given ``seed``.

``sample_size`` defaults to 32 (a size the pipelines' aspect-ratio binning accepts), but any
multiple of ``vae_scale_factor * 2`` pixels can be generated: for small images call the pipeline
with ``use_resolution_binning=False`` (binning would map them to ~256 px).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)

from ._common import (  # noqa: F401  (defined here before; still importable from here)
    DiTLikeSpec,
    atomic_save,
    build_components,
    refuse_unless_empty,
    run_meta,
    save_built,
    spec_t5,
    tiny_vae,
)
from .tokenizers import build_t5_tokenizer

__all__ = [
    "PIXART_SPEC_FILE_NAME",
    "TinyPixArtSpec",
    "build_tiny_pixart_pipeline",
    "save_tiny_pixart_pipeline",
]

#: File written next to ``model_index.json`` by :func:`save_tiny_pixart_pipeline`.
PIXART_SPEC_FILE_NAME = "erasekit_tiny_pixart.json"

_VARIANTS = {"sigma": PixArtSigmaPipeline, "alpha": PixArtAlphaPipeline}


@dataclass
class TinyPixArtSpec(DiTLikeSpec):
    """Sizes of a tiny PixArt pipeline.

    Transformer: ``num_layers`` blocks of ``num_attention_heads x attention_head_dim`` width,
    ``sample_size`` latent cells (default image size), patch 2, learned sigma (8 output channels).
    VAE: ``vae_block_out_channels`` (one entry per level; downsampling ``2 ** (levels - 1)``).
    T5 encoder: ``t5_*`` (its width is the transformer's ``caption_channels``).
    The first nine fields (and ``inner_dim``, ``vae_scale_factor``, ``to_dict``) are shared with
    :class:`~erasekit.tiny.dit.TinyDiTSpec`.
    """

    sample_size: int = 32  # a new default; the field keeps its place after attention_head_dim

    t5_d_model: int = 32
    t5_d_kv: int = 16
    t5_d_ff: int = 64
    t5_num_layers: int = 2
    t5_num_heads: int = 2
    t5_vocab_size: int = 8192
    t5_max_length: int = 512

    def _more_problems(self) -> list[str]:
        if any(c % self.vae_norm_num_groups for c in self.vae_block_out_channels):
            return ["vae_norm_num_groups must divide every vae_block_out_channels entry"]
        return []


def _make_transformer(spec: TinyPixArtSpec) -> PixArtTransformer2DModel:
    return PixArtTransformer2DModel(
        **spec._transformer_kwargs(),
        cross_attention_dim=spec.inner_dim,
        caption_channels=spec.t5_d_model,
        norm_type="ada_norm_single",
        norm_eps=1e-6,
        use_additional_conditions=False,
    )


def pixart_scheduler() -> DPMSolverMultistepScheduler:
    """The scheduler configuration the published PixArt pipelines use."""
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        prediction_type="epsilon",
        lower_order_final=True,
        thresholding=False,
        timestep_spacing="linspace",
        steps_offset=0,
    )


def build_tiny_pixart_pipeline(
    spec: TinyPixArtSpec | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    variant: str = "sigma",
) -> PixArtSigmaPipeline | PixArtAlphaPipeline:
    """Build a tiny random PixArt pipeline on the CPU (``variant``: ``sigma`` or ``alpha``).

    Each model is created right after ``torch.manual_seed(seed + offset)`` so the weights depend only
    on ``(spec, seed)``; the caller's RNG state is restored afterwards.
    """
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(_VARIANTS)}, got {variant!r}")
    spec = spec if spec is not None else TinyPixArtSpec()
    makers = {"transformer": lambda: _make_transformer(spec), "vae": spec._vae, "text_encoder": lambda: spec_t5(spec)}
    models = build_components(makers, seed, dtype)
    return _VARIANTS[variant](
        tokenizer=build_t5_tokenizer(vocab_size=spec.t5_vocab_size, max_length=spec.t5_max_length),
        text_encoder=models["text_encoder"],
        vae=models["vae"],
        transformer=models["transformer"],
        scheduler=pixart_scheduler(),
    )


def save_tiny_pixart_pipeline(
    path: str | os.PathLike[str],
    spec: TinyPixArtSpec | None = None,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    variant: str = "sigma",
) -> Path:
    """Build a tiny PixArt pipeline and save it atomically (the folder may exist only if empty).

    Loads with ``DiffusionPipeline.from_pretrained(path)``; ``erasekit_tiny_pixart.json`` records
    the spec, seed, dtype and variant.

    Raises:
        ValueError: ``path`` is a file or a non-empty folder.
    """
    spec = spec if spec is not None else TinyPixArtSpec()
    refuse_unless_empty(path, "PixArt")
    meta = run_meta(seed, dtype, spec=spec.to_dict(), variant=variant)
    build = functools.partial(build_tiny_pixart_pipeline, spec, seed=seed, dtype=dtype, variant=variant)
    return save_built(path, build, PIXART_SPEC_FILE_NAME, meta, "PixArt")
