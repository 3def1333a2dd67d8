"""Which CPU settings change the demo's mask, and what a busy machine costs: side by side in one run.

Each configuration trains the ShapesCanvas demo recipe for a few iterations in a fresh process (the
instruction set and the OpenMP settings are read when torch starts) and prints seconds per iteration
and the sha256 of the logits: equal digests mean bit-identical training. Configurations:

* ``pinned``: erasekit's pinned numerics (:mod:`erasekit.reproducibility`) with 1 and 2 threads, on
  an idle machine and beside ``--busy`` processes that spin on the CPU (the pinned numerics look at the
  load when they start: briefly spinning waits when idle, sleeping ones when busy);
* ``library defaults``: what torch picks by itself (AVX-512 kernels where the processor has them,
  spinning OpenMP waits), the same ways;
* with ``--waits``, only the pinned numerics at 2 threads, each way of waiting forced: sleeping
  (``OMP_WAIT_POLICY=PASSIVE``), bounded spinning (``GOMP_SPINCOUNT``, erasekit's idle choice) and
  libgomp's default spin count (300,000), idle and beside ``--busy`` processes.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cpu_numerics.py [--iterations 6] [--busy 3] [--waits]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time

from erasekit.reproducibility import IDLE_SPINCOUNT, PINNED_ENVIRONMENT, WAIT_VARIABLES  # imports no torch

#: The ways of waiting ``--waits`` compares (environment beside the pinned numerics).
WAITS = {
    "sleeping": {"OMP_WAIT_POLICY": "PASSIVE"},
    f"spin {IDLE_SPINCOUNT}": {"GOMP_SPINCOUNT": IDLE_SPINCOUNT},
    "spin 300000 (libgomp's default)": {"GOMP_SPINCOUNT": "300000"},
}

CHILD = r"""
import json, os, sys, tempfile, time
threads, iterations, pinned = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
if pinned:
    from erasekit.reproducibility import pin_cpu_numerics
    pin_cpu_numerics(threads)
import torch
torch.set_num_threads(threads)
from erasekit.toyworld.demo import erasure_config
from erasekit.toyworld.world import World
from erasekit.methods import erase
config = erasure_config(World.load(), "circle", [f"train.iterations={iterations}"], anchor="square")
with tempfile.TemporaryDirectory() as folder:
    result = erase(config, os.path.join(folder, "mask")).result
from erasekit.outputs import tensors_sha256  # the demo's mask_sha256: the logits are float32 already
print(json.dumps({"seconds_per_iteration": result.seconds / iterations, "digest": tensors_sha256(result.logits)[:16],
                  "capability": torch.backends.cpu.get_cpu_capability()}))
"""


def _spin(stop_at: float) -> None:
    while time.time() < stop_at:
        pass


def _child(threads: int, iterations: int, pinned: bool, wait: dict[str, str] | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (*PINNED_ENVIRONMENT, *WAIT_VARIABLES)}
    env.update(wait or {}, HF_HUB_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(threads), str(iterations), "1" if pinned else "0"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--busy", type=int, default=3, help="spinning processes beside the busy runs")
    parser.add_argument("--waits", action="store_true", help="compare the ways of waiting (pinned, 2 threads)")
    args = parser.parse_args()
    if args.waits:
        runs = [(f"pinned, {name}", busy, 2, True, wait) for busy in (0, args.busy) for name, wait in WAITS.items()]
    else:
        runs = [
            ("pinned" if pinned else "library defaults", busy, threads, pinned, None)
            for pinned in (True, False)
            for busy in (0, args.busy)
            for threads in (1, 2)
        ]
    rows = []
    for numerics, busy, threads, pinned, wait in runs:
        spinners = [multiprocessing.Process(target=_spin, args=(time.time() + 3600,)) for _ in range(busy)]
        for p in spinners:
            p.start()
        try:
            result = _child(threads, args.iterations, pinned, wait)
        finally:
            for p in spinners:
                p.terminate()
        rows.append({"numerics": numerics, "busy": busy, "threads": threads, **result})
        print(json.dumps(rows[-1]), flush=True)
    print(
        "\n| numerics | busy processes | threads | s / iteration | kernels | logits digest |\n"
        "| --- | ---: | ---: | ---: | --- | --- |"
    )
    for row in rows:
        print(
            f"| {row['numerics']} | {row['busy']} | {row['threads']} | {row['seconds_per_iteration']:.2f} | "
            f"{row['capability']} | `{row['digest']}` |"
        )


if __name__ == "__main__":
    main()
