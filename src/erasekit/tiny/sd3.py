"""Tiny, randomly initialised Stable Diffusion 3 / 3.5 pipelines for tests and examples.

The pipeline has the real SD3 architecture -- ``SD3Transformer2DModel`` (MM-DiT joint blocks, the
last one ``context_pre_only``; SD3.5's extra image self-attention ``attn2`` in the blocks listed in
``dual_attention_layers``; RMS q/k-norm like SD3.5), two ``CLIPTextModelWithProjection`` encoders
whose pooled projections concatenate to the pooled embedding, a T5 encoder, ``AutoencoderKL``
with the 8x downsampling of SD3 and ``FlowMatchEulerDiscreteScheduler`` with shift 3.0 -- at tiny
sizes, so it builds in about a second and samples a 32x32 image in a fraction of a second on a
CPU. Weights are random; every code path of ``StableDiffusion3Pipeline`` is exercised.
Everything is deterministic given ``seed``; nothing is downloaded.

Default sizes: 3 joint blocks of 4 heads x 8 channels (width 32, block 0 with dual attention,
block 2 ``context_pre_only``), CLIP widths 16 and 24 (pooled 40), T5 width 48 (the CLIP states,
16 + 24 = 40 channels, are zero-padded to 48 as the pipeline does), 4 latent channels.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from ._common import build_components, clip_config, run_meta, save_built, tiny_t5, tiny_vae
from .tokenizers import build_clip_tokenizer, build_t5_tokenizer

__all__ = ["SD3_SPEC_FILE_NAME", "build_tiny_sd3_pipeline", "save_tiny_sd3_pipeline"]

#: File written next to ``model_index.json`` by :func:`save_tiny_sd3_pipeline`.
SD3_SPEC_FILE_NAME = "erasekit_tiny_sd3.json"

_CLIP_HIDDEN = (16, 24)
_T5_WIDTH = 48
_T5_VOCAB = 8192
_LATENT_CHANNELS = 4
#: SD3's VAE latent normalisation.
_VAE_SCALING, _VAE_SHIFT = 1.5305, 0.0609


def _transformer(num_layers: int, dual_attention_layers: tuple[int, ...], qk_norm: str | None) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=8,  # latent size of the default 64x64 image
        patch_size=2,
        in_channels=_LATENT_CHANNELS,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=_T5_WIDTH,
        caption_projection_dim=32,  # the blocks' width: heads x head_dim
        pooled_projection_dim=sum(_CLIP_HIDDEN),
        out_channels=_LATENT_CHANNELS,
        pos_embed_max_size=16,  # images up to 256x256
        dual_attention_layers=tuple(dual_attention_layers),
        qk_norm=qk_norm,
    )


def _vae() -> AutoencoderKL:
    return tiny_vae((8, 8, 16, 16), _LATENT_CHANNELS, 4, _VAE_SCALING, sample_size=64, shift_factor=_VAE_SHIFT)


def _clip(hidden: int) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(clip_config(hidden, act="gelu"))


def _t5() -> T5EncoderModel:
    return tiny_t5(_T5_VOCAB, _T5_WIDTH, d_kv=16, d_ff=64, num_layers=2, num_heads=3)


def build_tiny_sd3_pipeline(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    *,
    num_layers: int = 3,
    dual_attention_layers: tuple[int, ...] = (0,),
    qk_norm: str | None = "rms_norm",
    shift: float = 3.0,
) -> StableDiffusion3Pipeline:
    """Build a tiny randomly initialised ``diffusers.StableDiffusion3Pipeline`` on the CPU.

    Args:
        seed: base seed; each model is created right after ``torch.manual_seed(seed + offset)``, so
            its weights depend only on the seed and its own offset. The caller's RNG state is restored.
        dtype: dtype of the neural networks (initialised in float32, then cast).
        num_layers: joint blocks (the last is ``context_pre_only``); at least 2.
        dual_attention_layers: blocks with SD3.5's extra self-attention (``()`` for an SD3.0 layout).
        qk_norm: ``"rms_norm"`` like SD3.5, ``None`` like SD3.0.
        shift: the flow-matching scheduler's shift (3.0 like SD3 / SD3.5).

    Returns:
        The pipeline; images must be multiples of 16 pixels (VAE factor 8 x patch 2) and at most
        256 pixels a side; e.g. ``height=width=32, num_inference_steps=3, max_sequence_length=16``.
    """
    if num_layers < 2:
        raise ValueError(f"num_layers must be at least 2 (the last block is context_pre_only), got {num_layers}")
    bad = [i for i in dual_attention_layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"dual_attention_layers {bad} are outside 0..{num_layers - 1}")
    makers: dict[str, Callable[[], torch.nn.Module]] = {
        "transformer": lambda: _transformer(num_layers, tuple(dual_attention_layers), qk_norm),
        "vae": _vae,
        "text_encoder": lambda: _clip(_CLIP_HIDDEN[0]),
        "text_encoder_2": lambda: _clip(_CLIP_HIDDEN[1]),
        "text_encoder_3": _t5,
    }
    models = build_components(makers, seed, dtype)
    return StableDiffusion3Pipeline(
        transformer=models["transformer"],
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=models["vae"],
        text_encoder=models["text_encoder"],
        tokenizer=build_clip_tokenizer(max_length=77),
        text_encoder_2=models["text_encoder_2"],
        tokenizer_2=build_clip_tokenizer(max_length=77),
        text_encoder_3=models["text_encoder_3"],
        tokenizer_3=build_t5_tokenizer(vocab_size=_T5_VOCAB, max_length=256),
    )


def save_tiny_sd3_pipeline(
    path: str | os.PathLike[str], seed: int = 0, *, dtype: torch.dtype = torch.float32, **options: Any
) -> Path:
    """Build :func:`build_tiny_sd3_pipeline` (``options`` passed on) and ``save_pretrained`` it atomically.

    The folder is written under a hidden temporary sibling name and renamed to ``path`` (which may
    exist only as an empty folder), so a reader never sees a half-written pipeline;
    ``erasekit_tiny_sd3.json`` records the seed, dtype and options. Returns the absolute path; it loads
    with ``DiffusionPipeline.from_pretrained(path)``.

    Raises:
        ValueError: if ``path`` exists and is a file or a non-empty folder.
    """
    build = functools.partial(build_tiny_sd3_pipeline, seed, dtype, **options)
    return save_built(path, build, SD3_SPEC_FILE_NAME, run_meta(seed, dtype, options=options), "SD3")
