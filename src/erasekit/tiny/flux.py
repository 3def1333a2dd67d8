"""Tiny, randomly initialised FLUX pipelines for tests, examples and benchmarks.

The pipeline has the real FLUX.1 architecture (``FluxTransformer2DModel`` with double-
and single-stream blocks, CLIP-L-style + T5-style text encoders, ``AutoencoderKL``,
``FlowMatchEulerDiscreteScheduler`` configured like FLUX.1-schnell) but tiny sizes, so it
builds in about a second and generates a small image in well under a second on a CPU.
The weights are random (not trained): images are noise-like, but every code path of
``diffusers.FluxPipeline`` is exercised and the outputs depend on the prompt.

Everything is deterministic given ``seed``, and nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel

from ._common import (
    SEED_OFFSETS,
    SpecMixin,
    build_components,
    clip_config,
    positive_problems,
    run_meta,
    save_built,
    spec_t5,
    tiny_vae,
)
from .tokenizers import build_clip_tokenizer, build_t5_tokenizer

__all__ = [
    "COMPONENT_SEED_OFFSETS",
    "SPEC_FILE_NAME",
    "TinyFluxSpec",
    "build_tiny_flux_pipeline",
    "save_tiny_flux_pipeline",
]

#: File written next to ``model_index.json`` by :func:`save_tiny_flux_pipeline`.
SPEC_FILE_NAME = "erasekit_tiny_flux.json"

#: ``torch.manual_seed(seed + offset)`` is called before each component is created, so
#: a component's weights depend only on ``seed`` and its own offset (not on build
#: order); the offsets are far apart so seeds below 10000 never share a random stream.
COMPONENT_SEED_OFFSETS: dict[str, int] = {
    name: SEED_OFFSETS[name] for name in ("transformer", "vae", "text_encoder", "text_encoder_2")
}


@dataclass
class TinyFluxSpec(SpecMixin):
    """Sizes of a tiny FLUX pipeline (defaults: ~2.1 M parameters, 1.6 M of them in CLIP's
    token embedding).

    Transformer (``FluxTransformer2DModel``):
        num_layers: double-stream (MM-DiT) blocks.
        num_single_layers: single-stream blocks.
        num_attention_heads, attention_head_dim: inner width is their product.
        axes_dims_rope: RoPE dims for the (text/index, row, column) axes; must be even and
            sum to ``attention_head_dim``.
        guidance_embeds: ``False`` like FLUX.1-schnell, ``True`` like FLUX.1-dev.

    VAE (``AutoencoderKL``):
        latent_channels: the transformer gets ``4 * latent_channels`` input channels
            because FLUX packs latents in 2x2 patches (FLUX.1 itself uses 16).
        vae_block_out_channels: one entry per resolution level; the VAE downsamples by
            ``2 ** (len - 1)`` (default 8, like FLUX), so height and width must be
            multiples of ``2 * vae_scale_factor`` (16 by default).
        vae_layers_per_block, vae_norm_num_groups: must divide every block width.
        vae_scaling_factor, vae_shift_factor: latent normalisation (FLUX.1's values).

    CLIP text encoder (``CLIPTextModel``, pooled output -> ``pooled_projection_dim``):
        clip_hidden_size, clip_intermediate_size, clip_num_layers, clip_num_heads,
        clip_max_length (tokenizer ``model_max_length`` and position embeddings).

    T5 text encoder (``T5EncoderModel``, gated-GELU like T5 v1.1; hidden states ->
    ``joint_attention_dim``):
        t5_d_model, t5_d_kv, t5_d_ff, t5_num_layers, t5_num_heads,
        t5_vocab_size (tokenizer size), t5_max_length (tokenizer ``model_max_length``).

    Scheduler (``FlowMatchEulerDiscreteScheduler``):
        scheduler_shift, use_dynamic_shifting: FLUX.1-schnell uses 1.0 / ``False``
            (FLUX.1-dev uses 3.0 / ``True``).
    """

    num_layers: int = 2
    num_single_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    guidance_embeds: bool = False

    latent_channels: int = 4
    vae_block_out_channels: tuple[int, ...] = (8, 8, 16, 16)
    vae_layers_per_block: int = 1
    vae_norm_num_groups: int = 4
    vae_scaling_factor: float = 0.3611
    vae_shift_factor: float = 0.1159

    clip_hidden_size: int = 32
    clip_intermediate_size: int = 64
    clip_num_layers: int = 2
    clip_num_heads: int = 2
    clip_max_length: int = 77

    t5_d_model: int = 32
    t5_d_kv: int = 16
    t5_d_ff: int = 64
    t5_num_layers: int = 2
    t5_num_heads: int = 2
    t5_vocab_size: int = 8192
    t5_max_length: int = 512

    scheduler_shift: float = 1.0
    use_dynamic_shifting: bool = False

    def __post_init__(self) -> None:
        self.axes_dims_rope = tuple(int(d) for d in self.axes_dims_rope)  # type: ignore[assignment]
        self.vae_block_out_channels = tuple(int(c) for c in self.vae_block_out_channels)
        problems: list[str] = []
        if len(self.axes_dims_rope) != 3:
            problems.append(f"axes_dims_rope must have 3 entries, got {self.axes_dims_rope}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            problems.append(
                f"sum(axes_dims_rope)={sum(self.axes_dims_rope)} must equal "
                f"attention_head_dim={self.attention_head_dim}"
            )
        if any(d <= 0 or d % 2 for d in self.axes_dims_rope):
            problems.append(f"axes_dims_rope entries must be positive and even: {self.axes_dims_rope}")
        if not self.vae_block_out_channels:
            problems.append("vae_block_out_channels must not be empty")
        if any(c % self.vae_norm_num_groups for c in self.vae_block_out_channels):
            problems.append(
                f"vae_norm_num_groups={self.vae_norm_num_groups} must divide every "
                f"vae_block_out_channels entry {self.vae_block_out_channels}"
            )
        if self.clip_hidden_size % self.clip_num_heads:
            problems.append("clip_num_heads must divide clip_hidden_size")
        problems += positive_problems(
            self,
            (
                "num_layers",
                "num_attention_heads",
                "attention_head_dim",
                "latent_channels",
                "clip_num_layers",
                "t5_num_layers",
                "t5_num_heads",
                "t5_d_kv",
            ),
        )
        if self.num_single_layers < 0:
            problems.append("num_single_layers must be >= 0")
        if problems:
            raise ValueError("invalid TinyFluxSpec: " + "; ".join(problems))

    @property
    def transformer_in_channels(self) -> int:
        """Channels of a packed latent token (``4 * latent_channels``)."""
        return 4 * self.latent_channels

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TinyFluxSpec:
        """Build a spec from :meth:`to_dict` output; unknown keys raise ``TypeError``."""
        return cls(**data)


def _make_transformer(spec: TinyFluxSpec) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=spec.transformer_in_channels,
        out_channels=None,
        num_layers=spec.num_layers,
        num_single_layers=spec.num_single_layers,
        attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=spec.t5_d_model,
        pooled_projection_dim=spec.clip_hidden_size,
        guidance_embeds=spec.guidance_embeds,
        axes_dims_rope=spec.axes_dims_rope,
    )


def _make_vae(spec: TinyFluxSpec) -> AutoencoderKL:
    return tiny_vae(
        spec.vae_block_out_channels,
        spec.latent_channels,
        spec.vae_norm_num_groups,
        spec.vae_scaling_factor,
        layers_per_block=spec.vae_layers_per_block,
        sample_size=32 * spec.vae_scale_factor,
        shift_factor=spec.vae_shift_factor,
        mid_block_add_attention=True,
    )


def _make_clip(spec: TinyFluxSpec) -> CLIPTextModel:
    return CLIPTextModel(
        clip_config(
            spec.clip_hidden_size,
            intermediate=spec.clip_intermediate_size,
            layers=spec.clip_num_layers,
            heads=spec.clip_num_heads,
            max_length=spec.clip_max_length,
        )
    )


def _make_scheduler(spec: TinyFluxSpec) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=spec.scheduler_shift,
        use_dynamic_shifting=spec.use_dynamic_shifting,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build_tiny_flux_pipeline(
    spec: TinyFluxSpec | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> FluxPipeline:
    """Build a tiny randomly initialised ``diffusers.FluxPipeline`` on the CPU.

    Each model is created right after ``torch.manual_seed(seed + offset)`` (offsets in
    :data:`COMPONENT_SEED_OFFSETS`; only the CPU generator is reseeded, which is all
    CPU initialisation uses), so the weights are a pure function of ``(spec, seed)``
    whatever the build order. The caller's global RNG state is restored afterwards.
    Models are put in ``eval()`` mode (all dropout is 0 anyway).

    Args:
        spec: sizes; default :class:`TinyFluxSpec()`.
        seed: base seed for the random weights.
        dtype: dtype of the three neural networks (weights are initialised in float32
            and then cast).

    Returns:
        A ``FluxPipeline`` on the CPU. Images must be multiples of
        ``2 * spec.vae_scale_factor`` pixels (16 by default); pass e.g.
        ``height=width=32, num_inference_steps=4, guidance_scale=0.0,
        max_sequence_length=32`` for a fast call.
    """
    spec = spec if spec is not None else TinyFluxSpec()
    makers = {
        "transformer": lambda: _make_transformer(spec),
        "vae": lambda: _make_vae(spec),
        "text_encoder": lambda: _make_clip(spec),
        "text_encoder_2": lambda: spec_t5(spec),
    }
    models = build_components(makers, seed, dtype, COMPONENT_SEED_OFFSETS)
    return FluxPipeline(
        scheduler=_make_scheduler(spec),
        vae=models["vae"],
        text_encoder=models["text_encoder"],
        tokenizer=build_clip_tokenizer(max_length=spec.clip_max_length),
        text_encoder_2=models["text_encoder_2"],
        tokenizer_2=build_t5_tokenizer(vocab_size=spec.t5_vocab_size, max_length=spec.t5_max_length),
        transformer=models["transformer"],
    )


def save_tiny_flux_pipeline(
    path: str | os.PathLike[str],
    spec: TinyFluxSpec | None = None,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Build a tiny FLUX pipeline and save it with ``save_pretrained``, atomically.

    The pipeline is written (safetensors) into a hidden temporary sibling folder which is
    then renamed to ``path``, so a reader never sees a half-written folder. Besides the
    diffusers layout, ``erasekit_tiny_flux.json`` records the spec, seed and dtype. The
    result loads with ``FluxPipeline.from_pretrained(path)`` or
    ``DiffusionPipeline.from_pretrained(path)``.

    Args:
        path: target folder; it may exist only as an empty folder. Parents are created.
        spec: sizes; default :class:`TinyFluxSpec()`.
        seed: see :func:`build_tiny_flux_pipeline`.
        dtype: see :func:`build_tiny_flux_pipeline`.

    Returns:
        The absolute path of the saved pipeline.

    Raises:
        ValueError: if ``path`` exists and is a file or a non-empty folder.
    """
    spec = spec if spec is not None else TinyFluxSpec()
    meta = run_meta(seed, dtype, spec=spec.to_dict())
    return save_built(
        path, lambda: build_tiny_flux_pipeline(spec, seed=seed, dtype=dtype), SPEC_FILE_NAME, meta, "FLUX"
    )
