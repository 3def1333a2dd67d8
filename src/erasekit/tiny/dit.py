"""Tiny, randomly initialised DiT pipelines for tests and examples.

The pipeline has the real DiT architecture (``DiTTransformer2DModel``: AdaLN-Zero blocks with a
per-block timestep + class embedding, 1000 classes + the null class, learned sigma),
``AutoencoderKL`` and ``DDIMScheduler`` configured like ``facebook/DiT-XL-2-256``, but tiny sizes
(default images: 32 x 32). Its ``id2label`` holds a handful of real ImageNet labels
(:data:`TINY_ID2LABEL`) and is registered in the pipeline config so that it survives
``save_pretrained``. Weights are random; nothing is downloaded; deterministic given ``seed``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from ._common import DiTLikeSpec, build_components, refuse_unless_empty, run_meta, save_built

__all__ = ["DIT_SPEC_FILE_NAME", "TINY_ID2LABEL", "TinyDiTSpec", "build_tiny_dit_pipeline", "save_tiny_dit_pipeline"]

#: File written next to ``model_index.json`` by :func:`save_tiny_dit_pipeline`.
DIT_SPEC_FILE_NAME = "erasekit_tiny_dit.json"

#: A few ImageNet-1k classes with their published label strings (comma-separated synonyms).
TINY_ID2LABEL: dict[int, str] = {
    0: "tench, Tinca tinca",
    1: "goldfish, Carassius auratus",
    88: "macaw",
    207: "golden retriever",
    281: "tabby, tabby cat",
    282: "tiger cat",
    417: "balloon",
    980: "volcano",
}


@dataclass
class TinyDiTSpec(DiTLikeSpec):
    """Sizes of a tiny DiT pipeline: ``num_layers`` blocks of ``num_attention_heads x attention_head_dim``,
    ``sample_size`` latent cells (patch 2), and a VAE with ``vae_block_out_channels`` (one entry per level).

    All fields (and ``inner_dim``, ``vae_scale_factor``, ``to_dict``) are those of the shared base also
    behind :class:`~erasekit.tiny.pixart.TinyPixArtSpec`.
    """

    def _more_problems(self) -> list[str]:
        return ["sample_size must be even (patch size 2)"] if self.sample_size % 2 else []

    @property
    def resolution(self) -> int:
        """The one image size this DiT generates (``sample_size x`` the VAE factor)."""
        return self.sample_size * self.vae_scale_factor


def _make_transformer(spec: TinyDiTSpec) -> DiTTransformer2DModel:
    return DiTTransformer2DModel(**spec._transformer_kwargs(), norm_type="ada_norm_zero")


def dit_scheduler() -> DDIMScheduler:
    """The scheduler configuration of ``facebook/DiT-XL-2-256``."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
    )


def build_tiny_dit_pipeline(
    spec: TinyDiTSpec | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    id2label: dict[int, str] | None = None,
) -> DiTPipeline:
    """Build a tiny random ``DiTPipeline`` on the CPU (labels: ``id2label`` or :data:`TINY_ID2LABEL`)."""
    spec = spec if spec is not None else TinyDiTSpec()
    labels = dict(TINY_ID2LABEL if id2label is None else id2label)
    models = build_components({"transformer": lambda: _make_transformer(spec), "vae": spec._vae}, seed, dtype)
    pipe = DiTPipeline(transformer=models["transformer"], vae=models["vae"], scheduler=dit_scheduler(), id2label=labels)
    pipe.register_to_config(id2label={str(k): v for k, v in labels.items()})
    return pipe


def save_tiny_dit_pipeline(
    path: str | os.PathLike[str],
    spec: TinyDiTSpec | None = None,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Build a tiny DiT pipeline and save it atomically (the folder may exist only if empty).

    Loads with ``DiffusionPipeline.from_pretrained(path)`` (class names included).

    Raises:
        ValueError: ``path`` is a file or a non-empty folder.
    """
    spec = spec if spec is not None else TinyDiTSpec()
    refuse_unless_empty(path, "DiT")
    build = functools.partial(build_tiny_dit_pipeline, spec, seed=seed, dtype=dtype)
    return save_built(path, build, DIT_SPEC_FILE_NAME, run_meta(seed, dtype, spec=spec.to_dict()), "DiT")
