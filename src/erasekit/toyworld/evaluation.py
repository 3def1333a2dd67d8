"""ShapesCanvas in ``erasekit evaluate``: the ``shapes`` detector, its prompt sets and the protocol's scores.

Generic evaluation never imports the toy world: its detector registry names this module's
:class:`ShapesDetector` by module and imports it only when the ``shapes`` detector, a
``shapes:VALUE`` prompt set or the ``shapes`` metric is asked for. Everything the evaluation
needs of the world comes through that class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ErasekitError
from ..evaluation.detectors import Detector
from ..evaluation.prompts import PromptItem, PromptSet
from ..evaluation.runner import Job
from ..outputs import folder_sha256
from . import protocol
from .render import ATTRIBUTES
from .world import SHIPPED_WORLD


class ShapesDetector(Detector):
    """The ShapesCanvas attribute classifiers; ``detected`` means the concept's attribute is predicted
    as the concept."""

    name = "shapes"

    def __init__(self, concept: str | None = None, model: str | None = None, threshold: float | None = None) -> None:
        """``model``: a world's ``detectors/`` folder (default: the shipped world's). ``threshold`` is not
        used: the classifiers' most likely value decides."""
        if not concept:
            raise ErasekitError(
                "the shapes detector needs a concept: use --prompts shapes:VALUE or pass --concept VALUE"
            )
        self.attribute, self.value = protocol.resolve_concept(concept)
        self.path = Path(model) if model else SHIPPED_WORLD / "detectors"
        if not self.path.is_dir():
            raise ErasekitError(
                f"ShapesCanvas detectors {str(self.path)!r} do not exist; "
                "pass --detector-model DIR with the world's detectors/ folder"
            )
        from .detectors import ShapesDetectors  # torch networks: loaded only once a detector is built

        self._model = ShapesDetectors.from_pretrained(self.path)

    @classmethod
    def prompt_set(cls, concept: str, per_group: int | None = None) -> PromptSet:
        """The protocol's evaluation samples of ``concept`` (target, synonym and in-domain prompts with
        their seeds and labels); by default as many per group as ``erasekit demo`` draws, so both give
        the same numbers."""
        _, value = protocol.resolve_concept(concept)
        per_group = per_group or protocol.PER_GROUP
        samples = protocol.evaluation_samples(value, per_group=per_group)
        items = [
            PromptItem(index=i, prompt=s.prompt, seed=s.seed, labels=s.scene.attributes(), group=s.group)
            for i, s in enumerate(samples)
        ]
        return PromptSet(
            name=f"shapes:{value}",
            source="erasekit.toyworld.protocol.evaluation_samples",
            items=items,
            kind="shapes",
            concept=value,
            extra={"per_group": per_group, "protocol_seed": protocol.EVALUATION_SEED},
        )

    def detect(self, paths: list[Path]) -> list[dict[str, Any]]:
        import numpy as np
        from PIL import Image

        records: list[dict[str, Any]] = []
        for start in range(0, len(paths), 64):
            chunk = paths[start : start + 64]
            pixels = []
            for path in chunk:
                with Image.open(path) as image:
                    pixels.append(np.asarray(image.convert("RGB").resize((32, 32), Image.BICUBIC), dtype=np.uint8))
            predictions = self._model.predict(np.stack(pixels))
            for i in range(len(chunk)):
                predicted = {attribute: str(values[i]) for attribute, values in predictions.items()}
                found = predicted.get(self.attribute) == self.value
                records.append({"detected": found, "score": float(found), "predicted": predicted})
        return records

    def protocol_scores(
        self, prompt_set: PromptSet, jobs: Sequence[Job], records: Sequence[dict[str, Any]]
    ) -> dict[str, float | None]:
        """UA, synonym UA, IRA and CRA (UnlearnCanvas) via :func:`erasekit.toyworld.protocol.score`, from
        this detector's ``records`` of the images of ``jobs`` drawn from a ``shapes:VALUE`` set."""
        samples = protocol.evaluation_samples(prompt_set.concept or "", per_group=int(prompt_set.extra["per_group"]))
        chosen = [samples[job.index] for job in jobs]
        predictions = {a: [r["predicted"].get(a, "none") for r in records] for a in ATTRIBUTES}
        scores = protocol.score(prompt_set.concept or "", chosen, predictions)
        return {k: float(v) if math.isfinite(v) else None for k, v in scores.items()}  # JSON has no NaN

    def provenance(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "sha256": folder_sha256(self.path),
            "concept": self.value,
            "attribute": self.attribute,
            "threshold": None,
        }
