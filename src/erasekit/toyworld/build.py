"""Build a ShapesCanvas world folder from scratch: ``erasekit toyworld train``.

The shipped world (``erasekit/toyworld/shapes_canvas``) was made by :func:`build_world` with its
defaults; ``world.json`` records the settings, the seconds each stage took and the measured quality.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from ..errors import ErasekitError
from ..outputs import atomic_directory, commit_directory
from .train import TrainSettings, train_world_pipeline
from .world import MORPH_DETECTORS, WORLD_FILE, World, measure_quality

#: The sampling settings the world's images are generated and judged at (true CFG, empty negative prompt).
SAMPLING: dict[str, Any] = {"steps": 12, "guidance_scale": 6.0, "resolution": 32, "max_sequence_length": 16}


def write_world_record(
    folder: Path, training: dict[str, Any], sampling: dict[str, Any] | None = None, count: int = 200
) -> dict[str, Any]:
    """Measure the quality of the world in ``folder`` (pipeline and detectors present) and write ``world.json``."""
    record: dict[str, Any] = {"name": "ShapesCanvas", "sampling": dict(sampling or SAMPLING), "training": training}
    (folder / WORLD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    started = time.perf_counter()
    record["quality"] = measure_quality(World.load(folder), count=count, progress=True)
    record["quality"]["seconds"] = round(time.perf_counter() - started, 1)
    (folder / WORLD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


#: The second network judge's width and share of in-between shapes (``detectors-morph/``).
MORPH_DETECTOR_WIDTH = 32
MORPH_FRACTION = 0.3


def build_world(
    output: str | Path,
    settings: TrainSettings | None = None,
    threads: int = 0,
    progress: bool = True,
    quality_count: int = 200,
) -> Path:
    """Train the pipeline and the detectors, measure the world, write it to ``output`` atomically."""
    from .detectors import ShapesDetectors, evaluate_detectors, train_detectors

    target = Path(output)
    if target.exists():
        raise ErasekitError(f"output {str(target)!r} already exists; choose another --output or remove it")
    settings = settings or TrainSettings(threads=threads)
    tmp = atomic_directory(target)
    try:
        started = time.perf_counter()
        pipe, record = train_world_pipeline(settings, progress=progress)
        pipe.save_pretrained(tmp / "pipeline")
        t0 = time.perf_counter()
        train_detectors(
            tmp / "detectors", seed=settings.seed, steps=settings.detector_steps, progress=progress, num_threads=1
        )
        record["seconds"]["detectors"] = time.perf_counter() - t0
        record["detector_accuracy"] = evaluate_detectors(ShapesDetectors.from_pretrained(tmp / "detectors"))
        # the second network judge: another seed and width, and in-between shapes with soft labels
        t0 = time.perf_counter()
        train_detectors(
            tmp / MORPH_DETECTORS,
            seed=settings.seed + 1,
            steps=settings.detector_steps,
            progress=progress,
            num_threads=1,
            width=MORPH_DETECTOR_WIDTH,
            morph_fraction=MORPH_FRACTION,
        )
        record["seconds"]["morph_detectors"] = time.perf_counter() - t0
        record["seconds"]["total"] = time.perf_counter() - started
        write_world_record(tmp, record, count=quality_count)
        commit_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
