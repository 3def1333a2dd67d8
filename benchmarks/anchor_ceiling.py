"""What each anchor allows: the strict UA of an exact mapping of the concept onto it, on the tuning draw.

An object erasure that maps the concept onto an anchor at best draws what the original model draws for
the anchor prompts (the concept's scenes and noise seeds, the concept replaced by the anchor:
:func:`erasekit.toyworld.protocol.anchor_samples`). Where the judges take those images for the concept,
they will take the erased ones for it too, so their strict UA is the most any erasure onto that anchor
can score. Scored on :func:`~erasekit.toyworld.protocol.tuning_samples` (never the evaluation draw), by
the demo's three judges. Prints one JSON line per anchor, then a table.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/anchor_ceiling.py --concept circle [--concept star] \\
        [--anchor square ...] [--images 96] [--threads 2]
"""

from __future__ import annotations

import argparse
import json

from erasekit.reproducibility import pin_cpu_numerics

KEYS = ("strict_ua", "strict_synonym_ua", "ua", "synonym_ua")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concept", action="append", help="an object of the world (repeatable; default circle)")
    parser.add_argument("--anchor", action="append", help="anchors to score (default: every other object, and empty)")
    parser.add_argument("--images", type=int, default=96, help="images per group of the tuning draw")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    pin_cpu_numerics(args.threads)  # before torch: the same kernels as the demo's

    import torch

    from erasekit.toyworld import protocol
    from erasekit.toyworld.demo import judge
    from erasekit.toyworld.render import OBJECTS
    from erasekit.toyworld.world import World

    torch.set_num_threads(args.threads)
    world = World.load()
    rows = []
    for concept in args.concept or ["circle"]:
        attribute, value = protocol.resolve_concept(concept)
        if attribute != "object":
            parser.error(f"--concept {concept!r} is a {attribute}; the ceilings are for objects")
        samples = protocol.tuning_samples(value, per_group=args.images)
        for anchor in args.anchor or [o for o in OBJECTS if o != value] + ["empty"]:
            reference = protocol.anchor_samples(value, samples, anchor)
            images = world.generate([s.prompt for s in reference], [s.seed for s in reference])
            scores = judge(world, value, reference, images)
            rows.append({"concept": value, "anchor": anchor, **{k: scores[k] for k in KEYS}})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| concept | anchor | strict UA | strict syn. UA | UA (detector) | syn. UA (detector) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['concept']} | {row['anchor']} | " + " | ".join(f"{100 * row[k]:.1f} %" for k in KEYS) + " |")
    return rows


if __name__ == "__main__":
    main()
