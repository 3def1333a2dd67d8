"""``--set`` overrides shared by the tests that fit a method on an in-memory tiny pipeline (``model.id=tiny``)."""

from __future__ import annotations


def tiny_overrides(steps: int = 3) -> list[str]:
    """A short CPU run on the tiny pipeline a test builds itself: float32, ``steps`` sampling steps at 32 px,
    16 text tokens, no checkpoints or trackers, concept ``cat`` mapped onto ``dog``."""
    return [
        "model.id=tiny",
        "model.device=cpu",
        "model.dtype=float32",
        f"sampling.steps={steps}",
        "sampling.resolution=32",
        "sampling.max_sequence_length=16",
        "train.checkpoint_every=0",
        "train.trackers=[]",
        "concept.concept=cat",
        "concept.anchor=dog",
    ]
