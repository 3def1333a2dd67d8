"""Tiny, randomly initialised Stable Diffusion (1.x/2.x-style) and SDXL pipelines for tests and examples.

The pipelines have the real architectures (``UNet2DConditionModel`` with cross-attention
transformer blocks and GEGLU feed-forwards, CLIP text encoders, ``AutoencoderKL`` with the 8x
downsampling of SD) at tiny sizes, so they build in about a second and sample a 32x32 image in a
fraction of a second on a CPU. Weights are random; every code path of ``StableDiffusionPipeline`` /
``StableDiffusionXLPipeline`` is exercised. Everything is deterministic given ``seed``; nothing is
downloaded.

* SD: 2 UNet levels (16, 32 channels; 2 and 4 heads of dim 8), one cross-attention down level,
  a cross-attention mid block and one cross-attention up level: 4 transformer blocks.
* SDXL: like SDXL's layout at small size: the first level without attention, then a level with
  2 transformer layers per attention (4 heads of dim 8); two CLIP text encoders (the second with a
  projection giving the pooled embedding) whose penultimate states concatenate to the
  cross-attention width; ``text_time`` added embeddings.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from ._common import build_components, clip_config, run_meta, save_built, tiny_vae
from .tokenizers import build_clip_tokenizer

__all__ = [
    "SD_SPEC_FILE_NAME",
    "SDXL_SPEC_FILE_NAME",
    "build_tiny_sd_pipeline",
    "build_tiny_sdxl_pipeline",
    "save_tiny_sd_pipeline",
    "save_tiny_sdxl_pipeline",
]

SD_SPEC_FILE_NAME = "erasekit_tiny_sd.json"
SDXL_SPEC_FILE_NAME = "erasekit_tiny_sdxl.json"

_CLIP_HIDDEN = 32
_SD_BETAS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
)


def _scheduler(name: str, prediction_type: str) -> Any:
    if name == "ddim":
        return DDIMScheduler(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False, prediction_type=prediction_type)
    if name == "euler":
        return EulerDiscreteScheduler(**_SD_BETAS, timestep_spacing="leading", prediction_type=prediction_type)
    if name == "dpm":
        return DPMSolverMultistepScheduler(
            **_SD_BETAS, algorithm_type="dpmsolver++", solver_order=2, prediction_type=prediction_type
        )
    if name == "pndm":
        return PNDMScheduler(**_SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False, prediction_type=prediction_type)
    raise ValueError(f"unknown scheduler {name!r}; choose ddim, euler, dpm or pndm")


def _vae() -> AutoencoderKL:
    return tiny_vae((8, 8, 16, 16), 4, 4, 0.18215, sample_size=64)


def _clip() -> CLIPTextModel:
    return CLIPTextModel(clip_config(_CLIP_HIDDEN))


def _unet(down: tuple[str, str], up: tuple[str, str], cross_attention_dim: int, **extra: Any) -> UNet2DConditionModel:
    """A 2-level UNet (16, 32 channels; 2 and 4 heads of dim 8) on 4 latent channels."""
    return UNet2DConditionModel(
        sample_size=4,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4),  # diffusers' legacy name: the head count per level (head_dim 8)
        **extra,
    )


def _sd_unet(use_linear_projection: bool) -> UNet2DConditionModel:
    return _unet(
        ("CrossAttnDownBlock2D", "DownBlock2D"),
        ("UpBlock2D", "CrossAttnUpBlock2D"),
        _CLIP_HIDDEN,
        use_linear_projection=use_linear_projection,
    )


def _sdxl_unet() -> UNet2DConditionModel:
    return _unet(
        ("DownBlock2D", "CrossAttnDownBlock2D"),
        ("CrossAttnUpBlock2D", "UpBlock2D"),
        2 * _CLIP_HIDDEN,
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + _CLIP_HIDDEN,
    )


def build_tiny_sd_pipeline(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    *,
    scheduler: str = "ddim",
    prediction_type: str = "epsilon",
    use_linear_projection: bool = False,
) -> StableDiffusionPipeline:
    """A tiny random ``StableDiffusionPipeline`` on the CPU (about 1.7 M parameters, mostly CLIP's embedding).

    Args:
        seed: base seed of the random weights (each component reseeded from it).
        dtype: dtype of the UNet, VAE and text encoder.
        scheduler: ``ddim`` (SD 2.x's sampler), ``euler`` (SDXL's), ``dpm`` (DPM-Solver++ order 2) or
            ``pndm`` (PLMS, SD 1.5's), with SD's betas.
        prediction_type: ``epsilon`` (SD 1.x, SD 2.x-base) or ``v_prediction`` (SD 2.x 768).
        use_linear_projection: ``True`` like SD 2.x, ``False`` like SD 1.x.

    Images must be multiples of 8 pixels; e.g. ``height=width=32, num_inference_steps=3``.
    """
    models = build_components(
        {"unet": lambda: _sd_unet(use_linear_projection), "vae": _vae, "text_encoder": _clip},
        seed,
        dtype,
    )
    return StableDiffusionPipeline(
        vae=models["vae"],
        text_encoder=models["text_encoder"],
        tokenizer=build_clip_tokenizer(max_length=77),
        unet=models["unet"],
        scheduler=_scheduler(scheduler, prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl_pipeline(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    *,
    scheduler: str = "euler",
    prediction_type: str = "epsilon",
) -> StableDiffusionXLPipeline:
    """A tiny random ``StableDiffusionXLPipeline`` on the CPU (Euler by default, like SDXL base).

    Two CLIP text encoders (hidden 32 each; the second with a 32-wide projection giving the pooled
    embedding), ``text_time`` added embeddings, empty negative prompts as zeros (SDXL's
    ``force_zeros_for_empty_prompt``), no watermarker. Images must be multiples of 8 pixels.
    """
    models = build_components(
        {
            "unet": _sdxl_unet,
            "vae": _vae,
            "text_encoder": _clip,
            "text_encoder_2": lambda: CLIPTextModelWithProjection(clip_config(_CLIP_HIDDEN, projection=_CLIP_HIDDEN)),
        },
        seed,
        dtype,
    )
    return StableDiffusionXLPipeline(
        vae=models["vae"],
        text_encoder=models["text_encoder"],
        text_encoder_2=models["text_encoder_2"],
        tokenizer=build_clip_tokenizer(max_length=77),
        tokenizer_2=build_clip_tokenizer(max_length=77),
        unet=models["unet"],
        scheduler=_scheduler(scheduler, prediction_type),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def save_tiny_sd_pipeline(
    path: str | os.PathLike[str], seed: int = 0, *, dtype: torch.dtype = torch.float32, **options: Any
) -> Path:
    """Build :func:`build_tiny_sd_pipeline` (``options`` passed on) and ``save_pretrained`` it atomically.

    The folder is written under a hidden temporary name and renamed to ``path`` (which may exist only
    as an empty folder); ``erasekit_tiny_sd.json`` records the seed, dtype and options. Returns the
    absolute path.
    """
    build = functools.partial(build_tiny_sd_pipeline, seed, dtype, **options)
    return save_built(path, build, SD_SPEC_FILE_NAME, run_meta(seed, dtype, options=options), "SD")


def save_tiny_sdxl_pipeline(
    path: str | os.PathLike[str], seed: int = 0, *, dtype: torch.dtype = torch.float32, **options: Any
) -> Path:
    """Build :func:`build_tiny_sdxl_pipeline` and ``save_pretrained`` it atomically
    (see :func:`save_tiny_sd_pipeline`)."""
    build = functools.partial(build_tiny_sdxl_pipeline, seed, dtype, **options)
    return save_built(path, build, SDXL_SPEC_FILE_NAME, run_meta(seed, dtype, options=options), "SDXL")
