"""The ShapesCanvas evaluation protocol (UnlearnCanvas metrics) for one erased concept.

For a concept (an attribute value such as ``circle``, ``red`` or ``checkered``):

* **target** prompts name the concept with its canonical word; **synonym** prompts name it with
  another word; **in-domain** prompts name another value of the same attribute; all of them use
  the canonical template with every attribute given (:func:`evaluation_samples`).
* UA (unlearning accuracy): share of target images where the detector no longer finds the concept;
  synonym UA: the same on synonym prompts; IRA (in-domain retain accuracy): share of in-domain
  images whose attribute is still detected correctly; CRA (cross-domain retain accuracy): on the
  in-domain images, the share of the *other* attributes detected correctly (:func:`score`).

Evaluation scenes and seeds come from their own random stream (:data:`EVALUATION_SEED`), disjoint
from the prompts and seeds an erasure trains on (:func:`erasure_prompts`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ErasekitError
from .prompts import CANONICAL_TEMPLATE, EMPTY_TEMPLATE, SYNONYMS, TEMPLATES, canonical_prompt, fill, synonym_prompt
from .render import ATTRIBUTES, Scene, sample_scene

EVALUATION_SEED = 1_000_003
#: Image seeds of evaluation samples start here; erasure training uses seeds below it.
EVALUATION_SEED_BASE = 1_000_000
#: Scenes and noise seeds of :func:`tuning_samples` (the noise seeds lie above every evaluation image's).
TUNING_SEED, TUNING_SEED_BASE = 77_777, 3_000_000
GROUPS = ("target", "synonym", "in_domain")
#: Evaluation images per group (``erasekit demo`` and ``erasekit evaluate --prompts shapes:VALUE``).
PER_GROUP = 192


@dataclass(frozen=True)
class Sample:
    """One evaluation image to generate: its prompt, noise seed, scene labels and group."""

    prompt: str
    seed: int
    scene: Scene
    group: str


def resolve_concept(concept: str) -> tuple[str, str]:
    """``"circle"`` -> ``("object", "circle")``; synonyms resolve to their canonical value.

    Raises:
        ErasekitError: the word names no ShapesCanvas value.
    """
    word = concept.strip().lower()
    for attribute, table in SYNONYMS.items():
        for value, names in table.items():
            if word == value or word in names:
                return attribute, value
    known = ", ".join(v for table in SYNONYMS.values() for v in table)
    raise ErasekitError(f"{concept!r} is not a ShapesCanvas concept; use one of: {known}")


def concept_pairs(concept: str) -> list[tuple[str, str]]:
    """Prompt pairs that differ only in ``concept``: every training template that names the concept's
    attribute, filled with the canonical word of every combination of the other attributes it names,
    once with the concept and once with each other value of its attribute (Ring-a-Bell's concept
    vector is the mean difference of the two sides' encodings).

    Raises:
        ErasekitError: the word names no ShapesCanvas value.
    """
    attribute, value = resolve_concept(concept)
    others = [v for v in ATTRIBUTES[attribute] if v != value]
    pairs: list[tuple[str, str]] = []
    for template in TEMPLATES:
        names = re.findall(r"\{(\w+)\}", template)
        if attribute not in names:
            continue
        rest = [n for n in names if n != attribute]
        for combination in itertools.product(*(ATTRIBUTES[n] for n in rest)):
            words = dict(zip(rest, combination))
            with_concept = fill(template, {**words, attribute: value})
            pairs.extend((with_concept, fill(template, {**words, attribute: other})) for other in others)
    return pairs


def evaluation_samples(
    concept: str,
    per_group: int = PER_GROUP,
    seed: int = EVALUATION_SEED,
    image_seed_base: int = EVALUATION_SEED_BASE,
    exclude: Sequence[str] = (),
) -> list[Sample]:
    """Target, synonym and in-domain samples for ``concept`` (``per_group`` each, deterministic).

    ``seed`` draws the scenes; the images' noise seeds count up from ``image_seed_base``. ``exclude``: values
    of the concept's attribute the in-domain group leaves out (the other concepts of an erasure of several,
    which are not retained); the target and synonym samples do not depend on it.
    """
    attribute, value = resolve_concept(concept)
    rng = np.random.default_rng(seed)
    others = _others(attribute, value, exclude)
    samples: list[Sample] = []
    image_seed = image_seed_base
    for group in GROUPS:
        for k in range(per_group):
            fixed_value = value if group != "in_domain" else others[k % len(others)]
            scene = sample_scene(rng, **{attribute: fixed_value})
            if group == "synonym":
                prompt = synonym_prompt(scene, attribute, 1 + k % max(1, len(SYNONYMS[attribute][value]) - 1))
            else:
                prompt = canonical_prompt(scene)
            samples.append(Sample(prompt=prompt, seed=image_seed, scene=scene, group=group))
            image_seed += 1
    return samples


def tuning_samples(concept: str, per_group: int = 96) -> list[Sample]:
    """A draw to tune recipes on: the protocol's groups, with scenes and noise seeds that
    :func:`evaluation_samples` never draws (scene seed :data:`TUNING_SEED`, noise seeds from
    :data:`TUNING_SEED_BASE`), so that a recipe chosen on it is not fitted to the evaluation draw."""
    return evaluation_samples(concept, per_group, seed=TUNING_SEED, image_seed_base=TUNING_SEED_BASE)


def anchor_samples(
    concept: str, samples: Sequence[Sample], anchor: str | None = None, exclude: Sequence[str] = ()
) -> list[Sample]:
    """The target and synonym samples as the erasure's anchor prompts would draw them.

    Same scenes and noise seeds; the prompt is the canonical one with the concept replaced by
    ``anchor`` (``None``: each other value of its attribute in turn, as :func:`erasure_prompts`
    pairs them; ``"empty"``: the empty background), and the group is kept. The original model's
    images of these prompts are what an erasure that maps the concept exactly onto its anchor would
    draw, so their :func:`score` (UA and synonym UA) is the most such an erasure can reach: where the
    model's own anchor images are taken for the concept, so are the erased ones.

    ``exclude``: values the ``None`` anchor does not take (the other concepts of an erasure of several).

    Raises:
        ErasekitError: ``anchor`` is not another value of the concept's attribute.
    """
    attribute, value = check_anchor(concept, anchor)
    others = _others(attribute, value, exclude)
    drawn = [s for s in samples if s.group != "in_domain"]
    return [
        Sample(_anchor_prompt(CANONICAL_TEMPLATE, s.scene, attribute, anchor, others, k), s.seed, s.scene, s.group)
        for k, s in enumerate(drawn)
    ]


def score(concept: str, samples: Sequence[Sample], predictions: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """UA, synonym UA, IRA and CRA (fractions in [0, 1]) from detector predictions per sample.

    Args:
        concept: the erased concept.
        samples: from :func:`evaluation_samples`.
        predictions: attribute -> predicted value per sample (the detectors' output).
    """
    attribute, value = resolve_concept(concept)
    if any(len(predictions[a]) != len(samples) for a in ATTRIBUTES):
        raise ValueError("one prediction per sample and attribute is needed")

    def mean(flags: list[bool]) -> float:
        return float(np.mean(flags)) if flags else float("nan")

    ua, synonym_ua, ira, cra = [], [], [], []
    for i, sample in enumerate(samples):
        found = predictions[attribute][i] == value
        if sample.group == "target":
            ua.append(not found)
        elif sample.group == "synonym":
            synonym_ua.append(not found)
        else:
            labels = sample.scene.attributes()
            ira.append(predictions[attribute][i] == labels[attribute])
            cra.extend(predictions[a][i] == labels[a] for a in ATTRIBUTES if a != attribute)
    return {"ua": mean(ua), "synonym_ua": mean(synonym_ua), "ira": mean(ira), "cra": mean(cra)}


def _others(attribute: str, value: str, exclude: Sequence[str] = ()) -> list[str]:
    """The values of ``attribute`` other than ``value`` and those in ``exclude``."""
    return [v for v in ATTRIBUTES[attribute] if v != value and v not in exclude]


def check_concepts(concepts: Sequence[str], anchors: Sequence[str | None]) -> list[tuple[str, str]]:
    """``(attribute, value)`` of each concept of an erasure of several, once each anchor suits its concept
    (:func:`check_anchor`) and names none of the erased values.

    Raises:
        ErasekitError: an unknown concept or a bad anchor, a concept given twice, concepts of different
            attributes (the protocol keeps each concept's other values; those of other attributes are
            drawn at random, erased ones among them), or an anchor that is another erased concept.
    """
    resolved = [check_anchor(c, a) for c, a in zip(concepts, anchors, strict=True)]
    values = [value for _, value in resolved]
    for k, value in enumerate(values):
        if value in values[:k]:
            raise ErasekitError(f"the concept {value!r} is given twice; name each concept once")
    attributes = sorted({attribute for attribute, _ in resolved})
    if len(attributes) > 1:
        raise ErasekitError(
            f"the concepts {', '.join(map(repr, values))} are of different attributes ({', '.join(attributes)}); "
            "several concepts erased together must be values of one attribute"
        )
    for (_, value), anchor in zip(resolved, anchors):
        if anchor in values:
            raise ErasekitError(f"anchor {anchor!r} for {value!r} is erased too; choose a value that is kept")
    return resolved


def check_anchor(concept: str, anchor: str | None) -> tuple[str, str]:
    """``(attribute, value)`` of ``concept`` once ``anchor`` is known to suit it (None always does).

    Raises:
        ErasekitError: the concept is unknown, or ``anchor`` is neither another value of its attribute
            nor ``"empty"`` for an object.
    """
    attribute, value = resolve_concept(concept)
    others = _others(attribute, value)
    if anchor is not None and anchor not in others and not (anchor == "empty" and attribute == "object"):
        extra = " or 'empty' (the empty background)" if attribute == "object" else ""
        raise ErasekitError(f"anchor {anchor!r} for {value!r}: use another {attribute} ({', '.join(others)}){extra}")
    return attribute, value


def _anchor_prompt(template: str, scene: Scene, attribute: str, anchor: str | None, others: list[str], k: int) -> str:
    """``scene`` described by ``template`` with its ``attribute`` replaced by ``anchor`` (``None``: the
    ``k``-th of ``others`` in turn; ``"empty"``: the empty background)."""
    if anchor == "empty":
        return fill(EMPTY_TEMPLATE, {"background": scene.background})
    words = scene.attributes()
    words[attribute] = anchor or others[k % len(others)]
    return fill(template, words)


def erasure_prompts(
    concept: str, count: int = 16, seed: int = 0, anchor: str | None = None, exclude: Sequence[str] = ()
) -> tuple[list[str], list[str], list[str]]:
    """Training prompts for erasing ``concept``: ``(concept prompts, anchor prompts, preservation prompts)``.

    Concept prompts name the concept (canonical word and synonyms, in turn); the anchor of each is
    the same description with the concept replaced by ``anchor``, another value of its attribute
    (default: each of the other values in turn; ``"empty"`` for an object: the empty background).
    Preservation prompts describe scenes with other values of the same attribute. All use the
    training templates other than the canonical one, so no erasure prompt is an evaluation prompt
    (:func:`evaluation_samples`), and scenes come from their own stream. ``exclude``: values neither
    preserved nor taken as the ``None`` anchor (the other concepts of an erasure of several).

    Raises:
        ErasekitError: ``anchor`` is not another value of the concept's attribute.
    """
    attribute, value = check_anchor(concept, anchor)
    others = _others(attribute, value, exclude)
    rng = np.random.default_rng(seed)
    names = SYNONYMS[attribute][value]
    templates = [t for t in TEMPLATES if t != CANONICAL_TEMPLATE and "{" + attribute + "}" in t]
    concept_prompts, anchors, preserve = [], [], []
    for k in range(count):
        template = templates[k % len(templates)]
        scene = sample_scene(rng, **{attribute: value})
        words = scene.attributes()
        # the name moves on one extra place each round of templates, so that every template meets
        # every name (a plain k % len(names) pairs 6 templates with 3 names the same way every round)
        words[attribute] = names[(k + k // len(templates)) % len(names)]
        concept_prompts.append(fill(template, words))
        anchors.append(_anchor_prompt(template, scene, attribute, anchor, others, k))
        other_scene = sample_scene(rng, **{attribute: others[k % len(others)]})
        preserve.append(fill(template, other_scene.attributes()))
    return concept_prompts, anchors, preserve


def strict_score(
    concept: str, samples: Sequence[Sample], found: Mapping[str, Sequence[bool]]
) -> dict[str, float | list[str]]:
    """UA counted strictly: an image is erased only when *every* judge finds the concept absent.

    Args:
        concept: the erased concept.
        samples: from :func:`evaluation_samples`.
        found: judge name -> per sample, whether that judge finds the concept in the image.

    Returns:
        ``strict_ua`` and ``strict_synonym_ua`` (no judge finds the concept), ``ambiguous`` and
        ``synonym_ambiguous`` (the judges disagree: some find it, some do not), each a fraction of the
        target or synonym images, and ``judges``, the names of the judges.
    """
    resolve_concept(concept)
    if not found or any(len(flags) != len(samples) for flags in found.values()):
        raise ValueError("one verdict per sample and judge is needed")
    votes = np.array([list(flags) for flags in found.values()], dtype=bool)  # (judges, samples)
    anyone, everyone = votes.any(axis=0), votes.all(axis=0)
    result: dict[str, float | list[str]] = {"judges": list(found)}
    for group, prefix in (("target", ""), ("synonym", "synonym_")):
        index = [i for i, s in enumerate(samples) if s.group == group]
        result[f"strict_{prefix}ua"] = float(np.mean(~anyone[index])) if index else float("nan")
        result[f"{prefix}ambiguous"] = float(np.mean(anyone[index] & ~everyone[index])) if index else float("nan")
    return result
