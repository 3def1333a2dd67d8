"""Train a variant of the demo recipe and score it strictly on the tuning draw, not the protocol's.

Recipes are chosen on :func:`erasekit.toyworld.protocol.tuning_samples` (scenes and noise seeds the
evaluation never draws), so that one chosen because it crossed the bar is not fitted to the evaluation
draw; ``erasekit demo`` (and its ``--seed`` spread) then measures the chosen one on the protocol. Prints
one JSON line: the strict and detector UA, the judges' disagreement, IRA and CRA (also relative to the
original model's on the same draw), what the erasure changed and the seconds. Any method (``--method``).

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/recipe_probe.py --output outputs/probe-empty \\
        --anchor empty --set train.iterations=150 [--seed 0] [--concept circle] [--images 96]
"""

from __future__ import annotations

import argparse
import json
import time

from erasekit.reproducibility import pin_cpu_numerics


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="erasure folder to create")
    parser.add_argument("--method", default="mask", help="the erasure method (erasekit methods)")
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--anchor", default=None, help="as erasekit demo --anchor")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--images", type=int, default=96, help="images per group of the tuning draw")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
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
    config = erasure_config(world, args.concept, [*args.overrides, f"train.seed={args.seed}"], anchor=args.anchor)
    config.method = args.method
    samples = protocol.tuning_samples(args.concept, per_group=args.images)
    started = time.perf_counter()
    erasure = erase(config, args.output)
    train_seconds = time.perf_counter() - started
    # the judging an `erasekit sweep` trial does too: one function, so the two cannot drift apart
    row = score_row(*mask_scores(world, args.concept, args.output, samples))
    row.update(
        method=args.method,
        changed=erasure.changed_text(),
        masked_fraction=erasure.report().get("masked_fraction"),
        train_seconds=round(train_seconds, 1),
        overrides=args.overrides,
        anchor=config.concept.anchor,
        seed=args.seed,
    )
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
