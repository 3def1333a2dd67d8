"""Image generation with the same stateless trajectory the trainer uses."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .arch import denoiser_of
from .arch.override import sampling_override
from .arch.samplers import run_trajectory
from .outputs import atomic_directory, commit_directory


@dataclass
class GeneratedImage:
    """One image and where it came from."""

    prompt_index: int
    prompt: str
    seed: int
    image: Image.Image

    @property
    def filename(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:48] or "prompt"
        return f"{self.prompt_index:04d}-{slug}-seed{self.seed}.png"


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) floats in [0, 1] -> PIL images."""
    array = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


@torch.no_grad()
def generate_latents(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    *,
    steps: int,
    resolution: int,
    guidance_scale: float = 0.0,
    max_sequence_length: int = 256,
) -> tuple[torch.Tensor, Any]:
    """Final latents for ``prompts`` (one noise seed each) and the trajectory (for ``decode``).

    The one place erasekit samples images: an inference-time erasure applied to ``pipe`` (a
    :class:`~erasekit.arch.override.SamplingOverride`) samples instead of the default trajectory.
    """
    override = sampling_override(pipe)
    if override is not None:
        return override.sample(
            pipe,
            prompts,
            seeds,
            steps=steps,
            resolution=resolution,
            guidance_scale=guidance_scale,
            max_sequence_length=max_sequence_length,
        )
    arch, _ = denoiser_of(pipe)
    encoded = arch.encode_prompts(pipe, prompts, max_sequence_length)
    trajectory = arch.trajectory(
        pipe, encoded, seeds, steps=steps, resolution=resolution, guidance_scale=guidance_scale
    )
    return run_trajectory(trajectory.step, trajectory.noise, trajectory.num_steps)[-1], trajectory


def generate_images(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    *,
    steps: int,
    resolution: int,
    guidance_scale: float = 0.0,
    max_sequence_length: int = 256,
    batch_size: int = 1,
    progress: bool = True,
) -> list[GeneratedImage]:
    """Every prompt with every seed; the same (prompt, seed) gives the same noise with or without masks."""
    jobs = [(i, p, s) for i, p in enumerate(prompts) for s in seeds]
    results: list[GeneratedImage] = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="generate", disable=not progress):
        batch = jobs[start : start + batch_size]
        latents, trajectory = generate_latents(
            pipe,
            [p for _, p, _ in batch],
            [s for _, _, s in batch],
            steps=steps,
            resolution=resolution,
            guidance_scale=guidance_scale,
            max_sequence_length=max_sequence_length,
        )
        for (i, p, s), image in zip(batch, to_pil(trajectory.decode(latents))):
            results.append(GeneratedImage(i, p, s, image))
    return results


def save_images(images: list[GeneratedImage], output: str | Path) -> Path:
    """Write PNGs (and ``prompts.txt``) into a new folder, atomically."""
    target = Path(output)
    if target.exists():
        raise FileExistsError(f"output {str(target)!r} already exists; choose another --output or remove it")
    tmp = atomic_directory(target)
    try:
        for item in images:
            item.image.save(tmp / item.filename)
        lines = [f"{item.filename}\t{item.seed}\t{item.prompt}" for item in images]
        (tmp / "images.tsv").write_text("file\tseed\tprompt\n" + "\n".join(lines) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_directory(tmp, target)
    return target
