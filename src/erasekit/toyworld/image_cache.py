"""The original model's images, cached: they depend only on the world and on what is drawn.

Every ``erasekit demo`` of a concept draws the same images with the unmasked model (the protocol's
evaluation prompts, the anchor prompts, the nearest-neighbour probe): about two minutes of a demo on
two cores. They are a function of the world's pipeline, its sampling settings, the prompts and the
noise seeds, so they are stored under a hash of exactly those (and of the torch version and the
CPU kernels in use, which draw them): as uint8 images, not as detector verdicts, so that any judge can score them.

Looked up in the world's own ``image-cache/`` folder (shipped for the default demo), then in the
user cache (``$ERASEKIT_CACHE``, default ``$XDG_CACHE_HOME/erasekit`` or ``~/.cache/erasekit``;
``ERASEKIT_CACHE=`` switches it off). A cached entry equals a fresh one exactly (tested).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ..outputs import folder_sha256, json_sha256, write_atomically

logger = logging.getLogger(__name__)

#: Folder of a world holding its shipped entries.
SHIPPED_FOLDER = "image-cache"
#: Bumped when what an entry holds, or how it is drawn, changes.
FORMAT = 1

_world_hashes: dict[tuple[str, float], str] = {}


def user_cache_dir() -> Path | None:
    """Where entries are written: ``$ERASEKIT_CACHE`` (empty: nowhere), else the XDG cache folder."""
    configured = os.environ.get("ERASEKIT_CACHE")
    if configured is not None:
        return Path(configured).expanduser() if configured.strip() else None
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(base) / "erasekit"


def world_hash(world: Any) -> str:
    """sha256 of every file of the world's pipeline folder (names and bytes)."""
    folder = Path(world.pipeline_path)
    stamp = (str(folder.resolve()), max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()), default=0.0))
    if stamp not in _world_hashes:
        _world_hashes[stamp] = folder_sha256(folder, raw_digests=True)
    return _world_hashes[stamp]


def entry_key(world: Any, prompts: Sequence[str], seeds: Sequence[int], latent_rows: Sequence[int] = ()) -> str:
    """The name of the entry holding these images (and the latents of ``latent_rows``)."""
    record = {
        "format": FORMAT,
        "world": world_hash(world),
        "sampling": world.sampling,
        "torch": torch.__version__,
        "kernels": torch.backends.cpu.get_cpu_capability(),  # AVX2 and AVX-512 kernels round differently
        "prompts": list(prompts),
        "seeds": [int(s) for s in seeds],
        "latent_rows": [int(i) for i in latent_rows],
    }
    return json_sha256(record)


def original_images(
    world: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    latent_rows: Sequence[int] = (),
    progress: bool = False,
    desc: str = "generating",
) -> tuple[np.ndarray, torch.Tensor]:
    """``world.generate(prompts, seeds)`` with the original model, from the cache when it holds them.

    Returns the images (N, H, W, 3) uint8 and the final latents of ``latent_rows`` (in that order).
    Only for the unmasked model: the entry's key knows nothing of masks.
    """
    name = entry_key(world, prompts, seeds, latent_rows) + ".safetensors"
    writable = user_cache_dir()
    for folder in (Path(world.path) / SHIPPED_FOLDER, writable):
        if folder is not None and (folder / name).is_file():
            try:
                entry = load_file(str(folder / name))
                return entry["images"].numpy(), entry["latents"]
            except (SafetensorError, OSError, KeyError) as exc:  # a damaged entry is drawn again
                logger.warning("ignoring cache entry %s: %s", folder / name, exc)
    images, latents = world.generate(prompts, seeds, progress=progress, desc=desc, return_latents=True)
    rows = latents[list(latent_rows)].contiguous()
    if writable is not None:
        _store(writable / name, images, rows)
    return images, rows


def _store(path: Path, images: np.ndarray, latents: torch.Tensor) -> None:
    """Write an entry under a temporary name, then rename it; a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, save({"images": torch.from_numpy(np.ascontiguousarray(images)), "latents": latents}))
    except OSError as exc:
        logger.warning(
            "could not write the image cache %s (%s); set ERASEKIT_CACHE to a writable folder", path.parent, exc
        )
