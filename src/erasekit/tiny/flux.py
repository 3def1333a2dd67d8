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

import dataclasses
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from .tokenizers import CLIP_VOCAB_SIZE, build_clip_tokenizer, build_t5_tokenizer

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
    "transformer": 0,
    "vae": 10_000,
    "text_encoder": 20_000,
    "text_encoder_2": 30_000,
}


@dataclass
class TinyFluxSpec:
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
        for name in (
            "num_layers",
            "num_attention_heads",
            "attention_head_dim",
            "latent_channels",
            "clip_num_layers",
            "t5_num_layers",
            "t5_num_heads",
            "t5_d_kv",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if self.num_single_layers < 0:
            problems.append("num_single_layers must be >= 0")
        if problems:
            raise ValueError("invalid TinyFluxSpec: " + "; ".join(problems))

    @property
    def inner_dim(self) -> int:
        """Transformer width (``num_attention_heads * attention_head_dim``)."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def vae_scale_factor(self) -> int:
        """Spatial downsampling of the VAE (pixels per latent cell)."""
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def transformer_in_channels(self) -> int:
        """Channels of a packed latent token (``4 * latent_channels``)."""
        return 4 * self.latent_channels

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (inverse of :meth:`from_dict`)."""
        data = dataclasses.asdict(self)
        data["axes_dims_rope"] = list(self.axes_dims_rope)
        data["vae_block_out_channels"] = list(self.vae_block_out_channels)
        return data

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
    levels = len(spec.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=spec.vae_block_out_channels,
        layers_per_block=spec.vae_layers_per_block,
        act_fn="silu",
        latent_channels=spec.latent_channels,
        norm_num_groups=spec.vae_norm_num_groups,
        sample_size=32 * spec.vae_scale_factor,
        scaling_factor=spec.vae_scaling_factor,
        shift_factor=spec.vae_shift_factor,
        force_upcast=True,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


def _make_clip(spec: TinyFluxSpec) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=spec.clip_hidden_size,
        intermediate_size=spec.clip_intermediate_size,
        projection_dim=spec.clip_hidden_size,
        num_hidden_layers=spec.clip_num_layers,
        num_attention_heads=spec.clip_num_heads,
        max_position_embeddings=spec.clip_max_length,
        hidden_act="quick_gelu",
        attention_dropout=0.0,
        pad_token_id=1,
        bos_token_id=49406,
        eos_token_id=49407,
    )
    return CLIPTextModel(config)


def _make_t5(spec: TinyFluxSpec) -> T5EncoderModel:
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
        "transformer": _make_transformer,
        "vae": _make_vae,
        "text_encoder": _make_clip,
        "text_encoder_2": _make_t5,
    }
    models: dict[str, torch.nn.Module] = {}
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        for name, make in makers.items():
            # torch.manual_seed(s) without also reseeding accelerator generators.
            torch.default_generator.manual_seed(seed + COMPONENT_SEED_OFFSETS[name])
            model = make(spec)
            if dtype != torch.float32:  # .to(dtype) logs a warning even when it is a no-op
                model = model.to(dtype=dtype)
            models[name] = model.eval()
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
    target = Path(path).expanduser().absolute()

    def _check_target() -> None:
        if target.is_dir():
            if any(target.iterdir()):
                raise ValueError(f"refusing to save a tiny FLUX pipeline into non-empty folder {target}")
        elif target.exists() or target.is_symlink():
            raise ValueError(f"refusing to save a tiny FLUX pipeline: {target} exists and is not a folder")

    _check_target()
    spec = spec if spec is not None else TinyFluxSpec()
    target.parent.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_flux_pipeline(spec, seed=seed, dtype=dtype)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        meta = {"spec": spec.to_dict(), "seed": seed, "dtype": str(dtype).removeprefix("torch.")}
        (tmp / SPEC_FILE_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _check_target()
        if target.is_dir():
            target.rmdir()  # empty (checked above); fails if it was filled meanwhile
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
