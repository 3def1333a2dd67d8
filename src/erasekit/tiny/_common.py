"""Pieces shared by the tiny pipeline families (not public API).

* :func:`build_components` -- create each model right after reseeding the CPU generator with
  ``seed + offset`` (:data:`SEED_OFFSETS`), cast it and put it in ``eval()`` mode.
* :func:`tiny_vae`, :func:`clip_config`, :func:`tiny_t5` / :func:`spec_t5` -- the small
  ``AutoencoderKL``, CLIP and T5 encoders the families are made of.
* :class:`SpecMixin`, :class:`DiTLikeSpec` -- what the ``Tiny*Spec`` dataclasses have in common.
* :func:`save_built` / :func:`atomic_save` -- ``save_pretrained`` into a hidden temporary sibling
  folder, write the erasekit JSON record, then rename onto the target.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, T5Config, T5EncoderModel

from ..outputs import atomic_directory, commit_directory
from .tokenizers import CLIP_VOCAB_SIZE

#: ``torch.manual_seed(seed + offset)`` is called before each component is created, so a
#: component's weights depend only on ``seed`` and its own offset (not on build order); the
#: offsets are far apart so seeds below 10000 never share a random stream.
SEED_OFFSETS: dict[str, int] = {
    "transformer": 0,
    "unet": 0,
    "vae": 10_000,
    "text_encoder": 20_000,
    "text_encoder_2": 30_000,
    "text_encoder_3": 40_000,
}


def build_components(
    makers: Mapping[str, Callable[[], torch.nn.Module]],
    seed: int,
    dtype: torch.dtype,
    offsets: Mapping[str, int] = SEED_OFFSETS,
) -> dict[str, torch.nn.Module]:
    """Call each maker (in order) right after reseeding with ``seed + offsets[name]``.

    Only the CPU generator is reseeded (all CPU initialisation uses), inside
    ``torch.random.fork_rng`` so the caller's global RNG state is restored. Models are cast to
    ``dtype`` (initialised in float32) and put in ``eval()`` mode.
    """
    models: dict[str, torch.nn.Module] = {}
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        for name, make in makers.items():
            # torch.manual_seed(s) without also reseeding accelerator generators.
            torch.default_generator.manual_seed(seed + offsets[name])
            model = make()
            if dtype != torch.float32:  # .to(dtype) logs a warning even when it is a no-op
                model = model.to(dtype=dtype)
            models[name] = model.eval()
    return models


# --------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------


def tiny_vae(
    block_out_channels: tuple[int, ...],
    latent_channels: int,
    groups: int,
    scaling_factor: float,
    *,
    layers_per_block: int = 1,
    sample_size: int = 32,
    shift_factor: float | None = None,
    **extra: Any,
) -> AutoencoderKL:
    """A small SD-style ``AutoencoderKL`` with one encoder/decoder block per ``block_out_channels`` entry.

    With ``shift_factor``, a FLUX / SD3-style VAE: shifted latents and no 1x1 (post-)quant
    convolutions. ``extra`` goes to ``AutoencoderKL`` as is. Only the arguments the families have
    always passed are passed, so the configs (their ``_use_default_values`` included) are unchanged.
    """
    levels = len(block_out_channels)
    if shift_factor is not None:
        extra = dict(
            act_fn="silu",
            shift_factor=shift_factor,
            force_upcast=True,
            use_quant_conv=False,
            use_post_quant_conv=False,
            **extra,
        )
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=groups,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        **extra,
    )


def clip_config(
    hidden: int,
    *,
    intermediate: int | None = None,
    projection: int | None = None,
    layers: int = 2,
    heads: int = 2,
    max_length: int = 77,
    act: str = "quick_gelu",
) -> CLIPTextConfig:
    """A CLIP text-encoder config over the real CLIP vocabulary (see :func:`.tokenizers.build_clip_tokenizer`).

    ``intermediate`` defaults to ``2 * hidden`` and ``projection`` to ``hidden``;
    ``max_length`` is the number of position embeddings.
    """
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        projection_dim=projection or hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_length,
        hidden_act=act,
        attention_dropout=0.0,
        pad_token_id=1,
        bos_token_id=49406,
        eos_token_id=49407,
    )


def tiny_t5(vocab_size: int, d_model: int, d_kv: int, d_ff: int, num_layers: int, num_heads: int) -> T5EncoderModel:
    """A gated-GELU (T5 v1.1-style) ``T5EncoderModel`` without dropout (``<pad>`` = 0, ``</s>`` = 1)."""
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


def spec_t5(spec: Any) -> T5EncoderModel:
    """:func:`tiny_t5` sized by a spec's ``t5_*`` fields."""
    return tiny_t5(
        spec.t5_vocab_size, spec.t5_d_model, spec.t5_d_kv, spec.t5_d_ff, spec.t5_num_layers, spec.t5_num_heads
    )


# --------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------


def positive_problems(spec: Any, names: Iterable[str]) -> list[str]:
    """``"<name> must be positive"`` for each of ``names`` that is not."""
    return [f"{name} must be positive" for name in names if getattr(spec, name) <= 0]


class SpecMixin:
    """Derived sizes and serialisation shared by the ``Tiny*Spec`` dataclasses."""

    num_attention_heads: int
    attention_head_dim: int
    vae_block_out_channels: tuple[int, ...]

    @property
    def inner_dim(self) -> int:
        """Transformer width (``num_attention_heads * attention_head_dim``)."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def vae_scale_factor(self) -> int:
        """Spatial downsampling of the VAE (pixels per latent cell)."""
        return 2 ** (len(self.vae_block_out_channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (tuples become lists)."""
        data = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {key: list(value) if isinstance(value, tuple) else value for key, value in data.items()}


@dataclass
class DiTLikeSpec(SpecMixin):
    """Fields shared by the PixArt and DiT specs: a patch-2 transformer with learned sigma and an SD-style VAE."""

    num_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 8
    sample_size: int = 8
    learned_sigma: bool = True
    latent_channels: int = 4
    vae_block_out_channels: tuple[int, ...] = (8, 8, 16)
    vae_norm_num_groups: int = 4
    vae_scaling_factor: float = 0.18215

    def __post_init__(self) -> None:
        self.vae_block_out_channels = tuple(int(c) for c in self.vae_block_out_channels)
        names = ("num_layers", "num_attention_heads", "attention_head_dim", "sample_size")
        problems = positive_problems(self, names) + self._more_problems()
        if problems:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(problems))

    def _more_problems(self) -> list[str]:
        return []

    def _transformer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments common to ``PixArtTransformer2DModel`` and ``DiTTransformer2DModel``."""
        return dict(
            num_attention_heads=self.num_attention_heads,
            attention_head_dim=self.attention_head_dim,
            in_channels=self.latent_channels,
            out_channels=2 * self.latent_channels if self.learned_sigma else self.latent_channels,
            num_layers=self.num_layers,
            sample_size=self.sample_size,
            patch_size=2,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,  # timesteps (PixArt) / classes (DiTPipeline's null class id is 1000)
            norm_elementwise_affine=False,
        )

    def _vae(self) -> AutoencoderKL:
        return tiny_vae(
            self.vae_block_out_channels, self.latent_channels, self.vae_norm_num_groups, self.vae_scaling_factor
        )


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------


def run_meta(seed: int, dtype: torch.dtype, **extra: Any) -> dict[str, Any]:
    """The JSON record of a saved tiny pipeline: ``seed``, ``dtype`` (e.g. ``"float32"``) and ``extra``."""
    return {"seed": seed, "dtype": str(dtype).removeprefix("torch."), **extra}


def check_target(target: Path, what: str) -> None:
    """Raise ``ValueError`` unless ``target`` is missing or an empty folder."""
    if target.is_dir():
        if any(target.iterdir()):
            raise ValueError(f"refusing to save a tiny {what} pipeline into non-empty folder {target}")
    elif target.exists() or target.is_symlink():
        raise ValueError(f"refusing to save a tiny {what} pipeline: {target} exists and is not a folder")


def refuse_unless_empty(path: str | os.PathLike[str], what: str) -> None:
    """Like :func:`check_target` with the one-sentence message of the PixArt and DiT savers."""
    where = Path(path).expanduser()
    if where.exists() and (not where.is_dir() or any(where.iterdir())):
        raise ValueError(
            f"refusing to save a tiny {what} pipeline into {where.absolute()}: it exists and is not an empty folder"
        )


def atomic_save(pipe: Any, path: str | os.PathLike[str], meta_name: str, meta: dict[str, Any], what: str) -> Path:
    """``save_pretrained`` (safetensors) into a hidden sibling folder, write ``meta_name``, then rename onto ``path``.

    ``path`` may exist only as an empty folder (checked again just before the rename); parents are
    created. Returns the absolute path; the temporary folder is removed on any failure.
    """
    target = Path(path).expanduser().absolute()
    check_target(target, what)
    tmp = atomic_directory(target)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / meta_name).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        check_target(target, what)
        if target.is_dir():
            target.rmdir()  # empty (checked above); fails if it was filled meanwhile
        commit_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save_built(
    path: str | os.PathLike[str], build: Callable[[], Any], meta_name: str, meta: dict[str, Any], what: str
) -> Path:
    """Check ``path`` (see :func:`check_target`), then ``build()`` the pipeline and :func:`atomic_save` it."""
    check_target(Path(path).expanduser().absolute(), what)
    return atomic_save(build(), path, meta_name, meta, what)
