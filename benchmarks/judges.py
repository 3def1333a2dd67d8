"""How the ShapesCanvas judges see shapes between two objects: the table in docs/reproducibility.md.

For each step ``t`` of the morph from one object to another (``render.render_morph``, random scenes),
the share of images each judge names as the first object, the geometric judge's ambiguous rate, and
the share in which the strict reading still finds the first object.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/judges.py [--start circle] [--end square] [--scenes 32]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from erasekit.toyworld.detectors import ShapesDetectors
from erasekit.toyworld.geometry import GeometricJudge
from erasekit.toyworld.render import render_morph, sample_scene
from erasekit.toyworld.world import MORPH_DETECTORS, SHIPPED_WORLD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--start", default="circle")
    parser.add_argument("--end", default="square")
    parser.add_argument("--scenes", type=int, default=32)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    networks = {
        name: ShapesDetectors.from_pretrained(SHIPPED_WORLD / folder)
        for name, folder in (("detector", "detectors"), ("morph_detector", MORPH_DETECTORS))
    }
    judge = GeometricJudge()
    rng = np.random.default_rng(args.seed)
    scenes = [sample_scene(rng, object=args.start) for _ in range(args.scenes)]
    print(
        f"| t | detector: {args.start} | morph_detector: {args.start} | geometric: {args.start} | geometric ambiguous "
        f"| strict reading finds {args.start} |\n| ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    for t in (0.0, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0):
        images = np.stack([render_morph(s, args.end, t) for s in scenes])
        named = [[p == args.start for p in net.predict(images)["object"]] for net in networks.values()]
        rates = [np.mean(flags) for flags in named]
        verdict = judge.judge(images)
        found = [any(flags) for flags in zip(*named, judge.finds(images, args.start))]
        print(
            f"| {t:.2f} | {rates[0]:.0%} | {rates[1]:.0%} | {np.mean([o == args.start for o in verdict.objects]):.0%} "
            f"| {np.mean(verdict.ambiguous):.0%} | {np.mean(found):.0%} |"
        )


if __name__ == "__main__":
    main()
