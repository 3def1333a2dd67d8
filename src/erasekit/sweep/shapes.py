"""The mask method's sweep objective on ShapesCanvas: train a recipe variant, judge it strictly.

A trial trains the demo's recipe (:data:`erasekit.toyworld.demo.RECIPE`, with a base recipe and the
trial's values on top) and scores the mask on the protocol's *tuning* draw
(:func:`erasekit.toyworld.protocol.tuning_samples`: scenes and noise seeds the evaluation never draws),
so that the recipes a study favours are not fitted to the evaluation draw; :meth:`rescore` then
measures the front's masks on the *evaluation* draw (:func:`~erasekit.toyworld.protocol.evaluation_samples`,
what ``erasekit demo`` reports). Both return the strict UA (no judge finds the concept) and the IRA.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..methods import apply_erasures, erase  # the method's fit and apply: the imports to follow if they move
from ..toyworld import protocol
from ..toyworld.demo import erasure_config, judge
from ..toyworld.image_cache import original_images
from ..toyworld.world import World

#: The judged numbers a row of :func:`mask_scores` carries.
SCORES = ("strict_ua", "strict_synonym_ua", "ua", "ambiguous", "ira", "cra")


def mask_scores(
    world: World, concept: str, mask: str | Path, samples: Sequence[protocol.Sample]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The original model's and the masked model's judged scores on ``samples``, from the same noise.

    The original images come from the image cache when it holds them; the mask is applied with hooks
    for the erased images and removed again. Each result is :func:`erasekit.toyworld.demo.judge`'s.
    """
    samples = list(samples)
    prompts, seeds = [s.prompt for s in samples], [s.seed for s in samples]
    before, _ = original_images(world, prompts, seeds)
    masked = apply_erasures(world.pipe, [mask])
    try:
        after = world.generate(prompts, seeds)
    finally:
        masked.remove()
    return judge(world, concept, samples, before), judge(world, concept, samples, after)


def score_row(original: Mapping[str, Any], erased: Mapping[str, Any]) -> dict[str, Any]:
    """The masked model's :data:`SCORES`, its IRA and CRA relative to the original's, and the original's own."""
    row: dict[str, Any] = {key: round(erased[key], 4) for key in SCORES}
    row.update(
        ira_of_original=round(erased["ira"] / original["ira"], 4),
        cra_of_original=round(erased["cra"] / original["cra"], 4),
        original={key: round(original[key], 4) for key in ("strict_ua", "ua", "ira", "cra")},
    )
    return row


def overrides_of(params: Mapping[str, Any]) -> list[str]:
    """``key=value`` overrides (as ``--set`` takes them) for a trial's values; JSON is valid YAML."""
    return [f"{key}={json.dumps(value)}" for key, value in params.items()]


class ShapesMaskObjective:
    """Train the mask recipe with a trial's values on ShapesCanvas and score it on the tuning draw.

    Args:
        concept: the concept to erase (a ShapesCanvas value).
        base: ``key=value`` overrides every trial starts from (a base recipe, flattened), on top of the
            demo's recipe; the trial's values come after them.
        anchor: as ``erasekit demo --anchor``.
        images: images per group of the tuning draw.
        seed: the training seed of every trial.
        world: a loaded world (default: the shipped one, loaded on first use).
    """

    metric_names = ("strict_ua", "ira")

    def __init__(
        self,
        concept: str = "circle",
        base: Sequence[str] = (),
        *,
        anchor: str | None = None,
        images: int = 96,
        seed: int = 0,
        world: World | None = None,
    ) -> None:
        protocol.check_anchor(concept, anchor)  # a bad concept fails before anything is trained
        self.concept, self.base, self.anchor = concept, list(base), anchor
        self.images, self.seed = images, seed
        self._world = world

    @property
    def world(self) -> World:
        if self._world is None:
            self._world = World.load()
        return self._world

    def train(self, params: Mapping[str, Any], folder: Path) -> tuple[Path, Any]:
        """Train the recipe with ``params`` into ``folder/mask``; returns the mask folder and the run's result."""
        overrides = [*self.base, *overrides_of(params), f"train.seed={self.seed}"]
        config = erasure_config(self.world, self.concept, overrides, anchor=self.anchor)
        mask = Path(folder) / "mask"
        return mask, erase(config, mask)

    def score(self, mask: Path, samples: Sequence[protocol.Sample]) -> dict[str, Any]:
        """:func:`score_row` of ``mask`` on ``samples``."""
        return score_row(*mask_scores(self.world, self.concept, mask, samples))

    def __call__(self, params: dict[str, Any], folder: Path) -> dict[str, Any]:
        """One trial: train, then score on :func:`~erasekit.toyworld.protocol.tuning_samples`."""
        started = time.perf_counter()
        mask, result = self.train(params, folder)
        row = self.score(mask, protocol.tuning_samples(self.concept, per_group=self.images))
        row.update(
            masked_fraction=round(result.masked_fraction, 4), train_seconds=round(time.perf_counter() - started, 1)
        )
        (Path(folder) / "scores.json").write_text(json.dumps(row, indent=2) + "\n")
        return {key: value for key, value in row.items() if not isinstance(value, dict)}

    def rescore(self, params: dict[str, Any], folder: Path, per_group: int = protocol.PER_GROUP) -> dict[str, Any]:
        """The trial's mask on the protocol's evaluation draw (retrained into ``folder`` when it is not
        there, e.g. trained by a worker on another machine)."""
        mask = Path(folder) / "mask"
        if not (mask / "masks.safetensors").is_file():
            mask, _ = self.train(params, folder)
        return self.score(mask, protocol.evaluation_samples(self.concept, per_group=per_group))
