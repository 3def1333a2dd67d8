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

import dataclasses
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)
from transformers import T5Config, T5EncoderModel

from .tokenizers import build_t5_tokenizer

__all__ = [
    "PIXART_SPEC_FILE_NAME",
    "TinyPixArtSpec",
    "build_tiny_pixart_pipeline",
    "save_tiny_pixart_pipeline",
]

#: File written next to ``model_index.json`` by :func:`save_tiny_pixart_pipeline`.
PIXART_SPEC_FILE_NAME = "erasekit_tiny_pixart.json"

_SEED_OFFSETS = {"transformer": 0, "vae": 10_000, "text_encoder": 20_000}
_VARIANTS = {"sigma": PixArtSigmaPipeline, "alpha": PixArtAlphaPipeline}


@dataclass
class TinyPixArtSpec:
    """Sizes of a tiny PixArt pipeline.

    Transformer: ``num_layers`` blocks of ``num_attention_heads x attention_head_dim`` width,
    ``sample_size`` latent cells (default image size), patch 2, learned sigma (8 output channels).
    VAE: ``vae_block_out_channels`` (one entry per level; downsampling ``2 ** (levels - 1)``).
    T5 encoder: ``t5_*`` (its width is the transformer's ``caption_channels``).
    """

    num_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 8
    sample_size: int = 32
    learned_sigma: bool = True

    latent_channels: int = 4
    vae_block_out_channels: tuple[int, ...] = (8, 8, 16)
    vae_norm_num_groups: int = 4
    vae_scaling_factor: float = 0.18215

    t5_d_model: int = 32
    t5_d_kv: int = 16
    t5_d_ff: int = 64
    t5_num_layers: int = 2
    t5_num_heads: int = 2
    t5_vocab_size: int = 8192
    t5_max_length: int = 512

    def __post_init__(self) -> None:
        self.vae_block_out_channels = tuple(int(c) for c in self.vae_block_out_channels)
        problems = [f"{n} must be positive" for n in ("num_layers", "num_attention_heads", "attention_head_dim", "sample_size") if getattr(self, n) <= 0]
        if any(c % self.vae_norm_num_groups for c in self.vae_block_out_channels):
            problems.append("vae_norm_num_groups must divide every vae_block_out_channels entry")
        if problems:
            raise ValueError("invalid TinyPixArtSpec: " + "; ".join(problems))

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["vae_block_out_channels"] = list(self.vae_block_out_channels)
        return data


def tiny_vae(block_out_channels: tuple[int, ...], latent_channels: int, groups: int, scaling_factor: float) -> AutoencoderKL:
    """A small SD-style ``AutoencoderKL`` (shared with the tiny DiT pipeline)."""
    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=groups,
        sample_size=32,
        scaling_factor=scaling_factor,
    )


def _make_transformer(spec: TinyPixArtSpec) -> PixArtTransformer2DModel:
    return PixArtTransformer2DModel(
        num_attention_heads=spec.num_attention_heads,
        attention_head_dim=spec.attention_head_dim,
        in_channels=spec.latent_channels,
        out_channels=2 * spec.latent_channels if spec.learned_sigma else spec.latent_channels,
        num_layers=spec.num_layers,
        cross_attention_dim=spec.inner_dim,
        caption_channels=spec.t5_d_model,
        sample_size=spec.sample_size,
        patch_size=2,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=False,
    )


def _make_t5(spec: TinyPixArtSpec) -> T5EncoderModel:
    config = T5Config(
        vocab_size=spec.t5_vocab_size,
        d_model=spec.t5_d_model,
        d_kv=spec.t5_d_kv,
        d_ff=spec.t5_d_ff,
        num_layers=spec.t5_num_layers,
        num_heads=spec.t5_num_heads,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


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
    makers = {
        "transformer": _make_transformer,
        "vae": lambda s: tiny_vae(s.vae_block_out_channels, s.latent_channels, s.vae_norm_num_groups, s.vae_scaling_factor),
        "text_encoder": _make_t5,
    }
    models: dict[str, torch.nn.Module] = {}
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        for name, make in makers.items():
            torch.default_generator.manual_seed(seed + _SEED_OFFSETS[name])
            model = make(spec)
            if dtype != torch.float32:
                model = model.to(dtype=dtype)
            models[name] = model.eval()
    return _VARIANTS[variant](
        tokenizer=build_t5_tokenizer(vocab_size=spec.t5_vocab_size, max_length=spec.t5_max_length),
        text_encoder=models["text_encoder"],
        vae=models["vae"],
        transformer=models["transformer"],
        scheduler=pixart_scheduler(),
    )


def atomic_save(pipe: Any, path: str | os.PathLike[str], meta_name: str, meta: dict[str, Any], what: str) -> Path:
    """``save_pretrained`` into a hidden sibling folder, write ``meta_name``, then rename onto ``path``."""
    target = Path(path).expanduser().absolute()

    def _check_target() -> None:
        if target.is_dir():
            if any(target.iterdir()):
                raise ValueError(f"refusing to save a tiny {what} pipeline into non-empty folder {target}")
        elif target.exists() or target.is_symlink():
            raise ValueError(f"refusing to save a tiny {what} pipeline: {target} exists and is not a folder")

    _check_target()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / meta_name).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _check_target()
        if target.is_dir():
            target.rmdir()
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


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
    if Path(path).expanduser().exists() and (not Path(path).expanduser().is_dir() or any(Path(path).expanduser().iterdir())):
        raise ValueError(f"refusing to save a tiny PixArt pipeline into {Path(path).expanduser().absolute()}: it exists and is not an empty folder")
    pipe = build_tiny_pixart_pipeline(spec, seed=seed, dtype=dtype, variant=variant)
    meta = {"spec": spec.to_dict(), "seed": seed, "dtype": str(dtype).removeprefix("torch."), "variant": variant}
    return atomic_save(pipe, path, PIXART_SPEC_FILE_NAME, meta, "PixArt")
