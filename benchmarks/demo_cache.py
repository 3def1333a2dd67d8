"""What the original model's image cache saves `erasekit demo`: drawing its images against reading them.

The demo draws three sets of images with the unmasked model (the nearest-neighbour probe, the
protocol's evaluation images with the in-domain latents, the anchor-prompt images); with the shipped
entries (or the user cache) it reads them instead (:mod:`erasekit.toyworld.image_cache`). This script
does both for each set in one process, side by side, and checks that they are equal.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/demo_cache.py [--concept circle] [--batches N]

``--batches N`` draws only the first N batches of 64 of each set and scales the time to the whole set
(a loaded machine); the comparison is exact on what was drawn.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="circle")
    parser.add_argument(
        "--batches", type=int, default=0, help="draw only the first N batches of 64 of each set (0: all)"
    )
    args = parser.parse_args(argv)

    from erasekit.toyworld import image_cache, protocol
    from erasekit.toyworld.demo import ANCHOR_SEED_BASE, erasure_config
    from erasekit.toyworld.world import World

    # only the shipped entries count as cached: the user cache is an empty folder for this run
    os.environ["ERASEKIT_CACHE"] = tempfile.mkdtemp(prefix="demo-cache-bench-")
    world = World.load()
    config = erasure_config(world, args.concept)  # reads or draws the probe images, to know the anchor
    samples = protocol.evaluation_samples(args.concept)
    references = protocol.anchor_samples(args.concept, samples, config.concept.anchor)
    probe = protocol.erasure_prompts(args.concept, count=24, seed=config.train.seed)[0]
    sets = {
        "nearest-neighbour probe": (probe, [ANCHOR_SEED_BASE + i for i in range(len(probe))], []),
        "original model": (
            [s.prompt for s in samples],
            [s.seed for s in samples],
            [i for i, s in enumerate(samples) if s.group == "in_domain"],
        ),
        "anchor prompts": ([s.prompt for s in references], [s.seed for s in references], []),
    }
    total_drawn = total_read = 0.0
    print(f"{'set':<26}{'images':>8}{'drawn s':>10}{'read s':>10}{'ratio':>10}  equal")
    for name, (prompts, seeds, rows) in sets.items():
        n = len(prompts) if not args.batches else min(len(prompts), 64 * args.batches)
        start = time.perf_counter()
        drawn = world.generate(prompts[:n], seeds[:n])
        drawn_s = (time.perf_counter() - start) * len(prompts) / n
        key = image_cache.entry_key(world, prompts, seeds, rows)
        shipped = (world.path / image_cache.SHIPPED_FOLDER / f"{key}.safetensors").is_file()
        start = time.perf_counter()
        images, _ = image_cache.original_images(world, prompts, seeds, latent_rows=rows) if shipped else (None, None)
        read_s = time.perf_counter() - start
        equal = bool(images is not None and np.array_equal(images[:n], drawn))
        total_drawn += drawn_s
        total_read += read_s
        ratio = drawn_s / read_s if shipped and read_s > 0 else math.nan
        print(
            f"{name:<26}{len(prompts):>8}{drawn_s:>10.1f}{read_s:>10.3f}{ratio:>10.0f}"
            f"  {equal if shipped else 'not shipped'}"
        )
    print(f"{'all':<26}{'':>8}{total_drawn:>10.1f}{total_read:>10.3f}  saved {total_drawn - total_read:.0f} s")


if __name__ == "__main__":
    main()
