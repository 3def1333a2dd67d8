"""Tiny, randomly initialised DiT pipelines for tests and examples.

The pipeline has the real DiT architecture (``DiTTransformer2DModel``: AdaLN-Zero blocks with a
per-block timestep + class embedding, 1000 classes + the null class, learned sigma),
``AutoencoderKL`` and ``DDIMScheduler`` configured like ``facebook/DiT-XL-2-256``, but tiny sizes
(default images: 32 x 32). Its ``id2label`` holds a handful of real ImageNet labels
(:data:`TINY_ID2LABEL`) and is registered in the pipeline config so that it survives
``save_pretrained``. Weights are random; nothing is downloaded; deterministic given ``seed``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from .pixart import atomic_save, tiny_vae

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

_SEED_OFFSETS = {"transformer": 0, "vae": 10_000}


@dataclass
class TinyDiTSpec:
    """Sizes of a tiny DiT pipeline: ``num_layers`` blocks of ``num_attention_heads x attention_head_dim``,
    ``sample_size`` latent cells (patch 2), and a VAE with ``vae_block_out_channels`` (one entry per level)."""

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
        problems = [f"{n} must be positive" for n in ("num_layers", "num_attention_heads", "attention_head_dim", "sample_size") if getattr(self, n) <= 0]
        if self.sample_size % 2:
            problems.append("sample_size must be even (patch size 2)")
        if problems:
            raise ValueError("invalid TinyDiTSpec: " + "; ".join(problems))

    @property
    def resolution(self) -> int:
        """The one image size this DiT generates (``sample_size x`` the VAE factor)."""
        return self.sample_size * 2 ** (len(self.vae_block_out_channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["vae_block_out_channels"] = list(self.vae_block_out_channels)
        return data


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
    models: dict[str, torch.nn.Module] = {}
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.default_generator.manual_seed(seed + _SEED_OFFSETS["transformer"])
        models["transformer"] = DiTTransformer2DModel(
            num_attention_heads=spec.num_attention_heads,
            attention_head_dim=spec.attention_head_dim,
            in_channels=spec.latent_channels,
            out_channels=2 * spec.latent_channels if spec.learned_sigma else spec.latent_channels,
            num_layers=spec.num_layers,
            sample_size=spec.sample_size,
            patch_size=2,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,  # DiTPipeline's null class id is hard-coded to 1000
            norm_type="ada_norm_zero",
            norm_elementwise_affine=False,
        )
        torch.default_generator.manual_seed(seed + _SEED_OFFSETS["vae"])
        models["vae"] = tiny_vae(spec.vae_block_out_channels, spec.latent_channels, spec.vae_norm_num_groups, spec.vae_scaling_factor)
        for name, model in models.items():
            if dtype != torch.float32:
                model = model.to(dtype=dtype)
            models[name] = model.eval()
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
    where = Path(path).expanduser()
    if where.exists() and (not where.is_dir() or any(where.iterdir())):
        raise ValueError(f"refusing to save a tiny DiT pipeline into {where.absolute()}: it exists and is not an empty folder")
    pipe = build_tiny_dit_pipeline(spec, seed=seed, dtype=dtype)
    meta = {"spec": spec.to_dict(), "seed": seed, "dtype": str(dtype).removeprefix("torch.")}
    return atomic_save(pipe, path, DIT_SPEC_FILE_NAME, meta, "DiT")
