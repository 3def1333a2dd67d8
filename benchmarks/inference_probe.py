"""Score a grid of settings of an inference-time method (``sld``, ``flowedit``) on ShapesCanvas's tuning draw.

The recipes of the inference-time methods are chosen here, on
:func:`erasekit.toyworld.protocol.tuning_samples` (scenes and noise seeds the evaluation never draws), never
on the protocol's evaluation draw; ``erasekit demo --method NAME`` then measures the chosen one. Nothing is
trained, so one process scores every variant against the same (cached) original images. Prints one JSON
line per variant: the strict and detector UA, IRA and CRA (also relative to the original model's), seconds.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/inference_probe.py --method sld --output /tmp/probe \\
        --variant "sld.preset=max" --variant "sld.preset=strong" [--concept circle] [--images 96]

A variant is a ``;``-separated list of ``key=value`` overrides on top of the demo's recipe.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from erasekit.reproducibility import pin_cpu_numerics


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", required=True, help="sld or flowedit (any registered method works)")
    parser.add_argument("--output", required=True, help="folder to create; one erasure folder per variant")
    parser.add_argument("--variant", action="append", default=[], help="'key=value;key=value' (repeatable)")
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--anchor", default=None, help="as erasekit demo --anchor")
    parser.add_argument("--images", type=int, default=96, help="images per group of the tuning draw")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    pin_cpu_numerics(args.threads)  # before torch: the same kernels as the demo's

    import torch

    from erasekit.methods import erase
    from erasekit.sweep.shapes import mask_scores, score_row
    from erasekit.toyworld import protocol
    from erasekit.toyworld.demo import erasure_config
    from erasekit.toyworld.world import World

    torch.set_num_threads(args.threads)
    world = World.load()
    samples = protocol.tuning_samples(args.concept, per_group=args.images)
    output = Path(args.output)
    output.mkdir(parents=True)
    rows = []
    for k, variant in enumerate(args.variant or [""]):
        overrides = [item.strip() for item in variant.split(";") if item.strip()]
        config = erasure_config(world, args.concept, overrides, anchor=args.anchor)
        config.method = args.method
        started = time.perf_counter()
        folder = output / f"variant-{k}"
        erase(config, folder)
        # the judging an `erasekit sweep` trial does: one function, so the two cannot drift apart
        row = score_row(*mask_scores(world, args.concept, folder, samples))
        row.update(
            seconds=round(time.perf_counter() - started, 1),
            overrides=overrides,
            anchor=config.concept.anchor,
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
