"""Generate the evaluation images: the original model and each erased variant, from the same noise.

Jobs are every (prompt, seed) of a prompt set. They are cut into batches once, from the job list
alone, so a batch always holds the same jobs whatever the number of processes and whatever a
previous interrupted run left behind: every image is computed in the same batch, and so comes out
bit-identical, in a 1-process run, an ``accelerate launch`` run (batch ``b`` goes to process
``b % num_processes``) and a resumed run (a batch is skipped only when all its images exist).
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import ErasekitError
from ..generate import GeneratedImage, generate_latents, to_pil
from ..outputs import write_atomically
from .prompts import PromptSet

ORIGINAL = "original"


@dataclass(frozen=True)
class Variant:
    """One model to evaluate: the original (no masks) or the original with masks combined (AND)."""

    name: str
    mask_dirs: tuple[str, ...] = ()

    @property
    def is_original(self) -> bool:
        return not self.mask_dirs


@dataclass(frozen=True)
class Job:
    """One image to generate per variant."""

    index: int
    prompt: str
    seed: int
    guidance: float

    @property
    def filename(self) -> str:
        # the same name as `erasekit generate` gives the image (prompt position, slug, seed)
        return GeneratedImage(self.index, self.prompt, self.seed, None).filename  # type: ignore[arg-type]


@dataclass
class GenerationSettings:
    """Sampling settings shared by every variant."""

    steps: int
    resolution: int
    guidance: float
    max_sequence_length: int
    batch_size: int = 1

    def record(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "resolution": self.resolution,
            "guidance": self.guidance,
            "max_sequence_length": self.max_sequence_length,
            "batch_size": self.batch_size,
        }


@dataclass
class RunStats:
    """What one process did: images generated and skipped, seconds per variant."""

    generated: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def variants_from_masks(mask_groups: list[list[str]]) -> list[Variant]:
    """``[[a], [b, c]]`` -> original, ``a``, ``b+c`` (names from the mask folder names, made unique)."""
    variants = [Variant(ORIGINAL)]
    seen = {ORIGINAL}
    for group in mask_groups:
        base = "+".join(Path(d).resolve().name for d in group) or "masks"
        name, k = base, 2
        while name in seen:
            name, k = f"{base}-{k}", k + 1
        seen.add(name)
        variants.append(Variant(name, tuple(group)))
    return variants


def plan_jobs(
    prompt_set: PromptSet, seeds: list[int] | None, guidance: float | None, default_guidance: float
) -> list[Job]:
    """Every (prompt, seed) to generate.

    ``seeds`` (``--seed``) replaces the set's per-prompt seeds: every prompt with every seed. Without it
    a prompt uses its own seed (I2P's ``evaluation_seed``, ShapesCanvas seeds), else 0. ``guidance``
    (``--guidance``) likewise replaces the set's per-prompt guidance (I2P's ``evaluation_guidance``),
    else ``default_guidance`` applies.
    """
    jobs = []
    for item in prompt_set.items:
        item_seeds = seeds if seeds else [item.seed if item.seed is not None else 0]
        scale = guidance if guidance is not None else (item.guidance if item.guidance is not None else default_guidance)
        for seed in item_seeds:
            jobs.append(Job(item.index, item.prompt, int(seed), float(scale)))
    return jobs


def make_batches(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """Consecutive jobs with the same guidance, at most ``batch_size`` per batch (one guidance per trajectory)."""
    batches: list[list[Job]] = []
    for job in jobs:
        if batches and len(batches[-1]) < batch_size and batches[-1][-1].guidance == job.guidance:
            batches[-1].append(job)
        else:
            batches.append([job])
    return batches


def _save_png(image: Any, path: Path) -> None:
    # written under a temporary name first: a killed run never leaves a truncated PNG that a resumed
    # run would take as finished
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_atomically(path, buffer.getvalue())


def generate_variants(
    pipe: Any,
    variants: list[Variant],
    jobs: list[Job],
    settings: GenerationSettings,
    images_dir: Path,
    *,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
) -> RunStats:
    """Generate this process's share of every variant's images into ``images_dir/VARIANT/``.

    Existing images are kept (resume). Erasures are applied for a variant and removed after it, so
    the same pipeline serves all variants.
    """
    from ..methods import apply_erasures

    stats = RunStats()
    batches = make_batches(jobs, settings.batch_size)
    mine = [b for k, b in enumerate(batches) if k % num_processes == process_index]
    for variant in variants:
        folder = images_dir / variant.name
        folder.mkdir(parents=True, exist_ok=True)
        masked = apply_erasures(pipe, list(variant.mask_dirs)) if variant.mask_dirs else None
        start = time.perf_counter()
        generated = skipped = 0
        try:
            bar = tqdm(mine, desc=f"generate {variant.name}", disable=not progress, unit="batch")
            for batch in bar:
                if all((folder / job.filename).is_file() for job in batch):
                    skipped += len(batch)
                    continue
                for job, image in zip(batch, _generate_batch(pipe, batch, settings)):
                    _save_png(image, folder / job.filename)
                generated += len(batch)
        finally:
            if masked is not None:
                masked.remove()
        stats.generated[variant.name] = generated
        stats.skipped[variant.name] = skipped
        stats.seconds[variant.name] = time.perf_counter() - start
    return stats


def _generate_batch(pipe: Any, batch: list[Job], settings: GenerationSettings) -> list[Any]:
    latents, trajectory = generate_latents(
        pipe,
        [job.prompt for job in batch],
        [job.seed for job in batch],
        steps=settings.steps,
        resolution=settings.resolution,
        guidance_scale=batch[0].guidance,
        max_sequence_length=settings.max_sequence_length,
    )
    with torch.no_grad():
        return to_pil(trajectory.decode(latents))


def iter_images(images_dir: Path, variants: list[Variant], jobs: list[Job]) -> Iterator[tuple[Variant, Job, Path]]:
    """Every (variant, job, image path); raises if an image is missing (an incomplete run)."""
    for variant in variants:
        for job in jobs:
            path = images_dir / variant.name / job.filename
            if not path.is_file():
                raise ErasekitError(
                    f"image {str(path)!r} is missing; run the same command again to finish the generation"
                )
            yield variant, job, path
