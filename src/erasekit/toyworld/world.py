"""The shipped ShapesCanvas world: its pipeline, its detectors, its sampling settings.

A world folder holds ``pipeline/`` (a ``FluxPipeline`` folder that stock diffusers loads),
``detectors/`` (:class:`~erasekit.toyworld.detectors.ShapesDetectors`) and ``world.json`` (the
sampling settings images are judged at, how the world was trained, and its measured quality).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ErasekitError
from ..generate import generate_latents

#: The world that ships inside the package.
SHIPPED_WORLD = Path(__file__).parent / "shapes_canvas"
WORLD_FILE = "world.json"
#: The folder of the second network judge (trained with in-between shapes) inside a world folder.
MORPH_DETECTORS = "detectors-morph"


@dataclass
class World:
    """A loaded world: ``pipe`` (FluxPipeline), ``detectors``, ``sampling`` keyword arguments.

    ``morph_detectors``: a second network judge, trained with shapes between objects and soft labels
    (``detectors-morph/``; None where the world has none), used for the strict UA.
    """

    path: Path
    pipe: Any
    detectors: Any
    sampling: dict[str, Any]
    record: dict[str, Any] = field(default_factory=dict)
    morph_detectors: Any = None

    @property
    def pipeline_path(self) -> Path:
        return self.path / "pipeline"

    @classmethod
    def load(cls, path: str | Path | None = None, *, pipeline: bool = True) -> World:
        """Load a world folder (default: the shipped one) on the CPU in float32.

        ``pipeline=False`` leaves the pipeline to :meth:`ensure_pipeline` (and :meth:`generate`, which
        calls it): a caller that may find everything it needs judged already (``erasekit bench``
        rerun) does not pay for loading diffusers and the model.
        """
        from .detectors import ShapesDetectors

        folder = Path(path) if path is not None else SHIPPED_WORLD
        record_file = folder / WORLD_FILE
        if not record_file.is_file():
            raise ErasekitError(
                f"{str(folder)!r} is not a ShapesCanvas world (no {WORLD_FILE}); "
                "use the shipped one (no argument) or build one with `erasekit toyworld train`"
            )
        record = json.loads(record_file.read_text())
        pipe = _load_pipeline(folder / "pipeline") if pipeline else None
        detectors = ShapesDetectors.from_pretrained(folder / "detectors")
        morph = folder / MORPH_DETECTORS
        return cls(
            path=folder,
            pipe=pipe,
            detectors=detectors,
            sampling=dict(record["sampling"]),
            record=record,
            morph_detectors=ShapesDetectors.from_pretrained(morph) if morph.is_dir() else None,
        )

    def ensure_pipeline(self) -> Any:
        """The world's pipeline, loaded now where :meth:`load` left it out."""
        if self.pipe is None:
            self.pipe = _load_pipeline(self.pipeline_path)
        return self.pipe

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        batch_size: int = 64,
        progress: bool = False,
        desc: str = "generating",
        return_latents: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, torch.Tensor]:
        """Images (N, H, W, 3) uint8 for ``prompts`` with one noise seed each, at the world's settings.

        Uses the same stateless trajectory as training and ``erasekit generate``, so whatever masks
        are installed on ``pipe.transformer`` apply.
        """
        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt is needed")
        pipe = self.ensure_pipeline()
        images, latents = [], []
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
            chunk = slice(start, start + batch_size)
            z, trajectory = generate_latents(pipe, list(prompts[chunk]), list(seeds[chunk]), **self.sampling)
            pixels = trajectory.decode(z)
            images.append((pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
            latents.append(z.float())
        stacked = np.concatenate(images)
        return (stacked, torch.cat(latents)) if return_latents else stacked


def _load_pipeline(folder: Path) -> Any:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure_quality(world: World, count: int = 200, seed: int = 2_000_003, progress: bool = False) -> dict[str, Any]:
    """How well the world's model draws what it is asked, judged by its detectors.

    ``count`` canonical prompts of random scenes seen in training (combinations not held out),
    ``count`` prompts naming the object by a synonym, and ``count // 4`` scenes of held-out combinations,
    all with noise seeds never used in training. Returns accuracies per attribute, per object, for
    synonyms and for the held-out combinations.
    """
    from .prompts import HELD_OUT, canonical_prompt, is_held_out, synonym_prompt
    from .render import ATTRIBUTES, OBJECTS, sample_scene

    rng = np.random.default_rng(seed)
    seen, held = [], []
    while len(seen) < count:
        scene = sample_scene(rng, object=OBJECTS[len(seen) % len(OBJECTS)])
        if not is_held_out(scene):
            seen.append(scene)
    combinations = sorted(HELD_OUT)
    for k in range(max(1, count // 4)):
        obj, colour, style = combinations[k % len(combinations)]
        held.append(sample_scene(rng, object=obj, colour=colour, style=style))
    groups = {
        "canonical": (seen, [canonical_prompt(s) for s in seen]),
        "synonym": (seen, [synonym_prompt(s, "object", 1 + k % 2) for k, s in enumerate(seen)]),
        "held_out": (held, [canonical_prompt(s) for s in held]),
    }
    result: dict[str, Any] = {"count": count, "seed": seed}
    base = seed * 10
    for name, (scenes, prompts) in groups.items():
        seeds = list(range(base, base + len(prompts)))
        base += len(prompts)
        images = world.generate(prompts, seeds, progress=progress, desc=f"quality ({name})")
        predicted = world.detectors.predict(images)
        correct = {a: np.array([predicted[a][i] == getattr(s, a) for i, s in enumerate(scenes)]) for a in ATTRIBUTES}
        if name == "synonym":
            result["synonym_object"] = float(correct["object"].mean())
            continue
        accuracies = {a: float(c.mean()) for a, c in correct.items()}
        if name == "canonical":
            result.update(accuracies)
            result["per_object"] = {
                o: float(correct["object"][[s.object == o for s in scenes]].mean()) for o in OBJECTS
            }
        else:
            result["held_out"] = accuracies
    return result
