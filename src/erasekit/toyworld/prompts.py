"""ShapesCanvas prompts: words, synonyms, templates, and the held-out attribute combinations.

Training prompts describe a scene with several templates and with synonyms for objects, colours
and styles; any attribute a prompt leaves out is random in its image. Evaluation uses the
canonical template (:func:`canonical_prompt`) and, for synonym checks, :func:`synonym_prompt`.
"""

from __future__ import annotations

import re

import numpy as np

from .render import ATTRIBUTES, BACKGROUNDS, COLOURS, OBJECTS, STYLES, Scene

#: Every word that names a value, canonical first. Used in training prompts.
SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "object": {
        "circle": ("circle", "disc", "round dot"),
        "square": ("square", "box", "block"),
        "triangle": ("triangle", "wedge", "trigon"),
        "star": ("star", "pentagram", "starlet"),
        "heart": ("heart", "love heart", "valentine"),
        "cross": ("cross", "plus sign", "plus"),
        "crescent": ("crescent", "moon", "half moon"),
        "diamond": ("diamond", "rhombus", "lozenge"),
    },
    "colour": {
        "red": ("red", "crimson", "scarlet"),
        "orange": ("orange", "amber", "tangerine"),
        "yellow": ("yellow", "golden", "lemon"),
        "green": ("green", "emerald", "lime"),
        "blue": ("blue", "azure", "cobalt"),
        "purple": ("purple", "violet", "lilac"),
    },
    "style": {
        "flat": ("flat", "solid"),
        "outline": ("outline", "line art"),
        "gradient": ("gradient", "shaded"),
        "checkered": ("checkered", "checkerboard"),
    },
    "background": {"black": ("black",), "white": ("white",), "gray": ("gray",)},
}

#: Training templates. ``{background}`` and ``{style}`` may be absent (the attribute is then random).
TEMPLATES: tuple[str, ...] = (
    "a {colour} {object} in {style} style on a {background} background",
    "{style} drawing of a {colour} {object}",
    "a {colour} {object} on a {background} background",
    "a {style} {colour} {object}",
    "{colour} {object}, {style}, {background} background",
    "a picture of a {colour} {object}",
    "a {object} on {background}",
)

CANONICAL_TEMPLATE = TEMPLATES[0]

#: Object-colour-style combinations never shown in training (all backgrounds): object ``i`` with
#: colour ``(2i + 1) mod 6`` in style ``i mod 4``. Reported separately (compositional generalisation).
#: Whole object-colour pairs are not held out: the erasure maps an object onto another in every colour,
#: and an anchor the model never saw in one colour is drawn badly there.
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset(
    (obj, COLOURS[(2 * i + 1) % len(COLOURS)], STYLES[i % len(STYLES)]) for i, obj in enumerate(OBJECTS)
)

#: The prompt that shows no object: the erasure anchor for object concepts.
EMPTY_TEMPLATE = "an empty {background} background"


def is_held_out(scene: Scene) -> bool:
    """Whether the scene's object-colour-style combination is one the model never saw in training."""
    return (scene.object, scene.colour, scene.style) in HELD_OUT


def fill(template: str, words: dict[str, str]) -> str:
    """Fill a template, with ``a``/``an`` chosen for the word that follows."""
    text = template.format(**words)
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def canonical_prompt(scene: Scene) -> str:
    """The evaluation prompt: every attribute with its canonical word."""
    return fill(CANONICAL_TEMPLATE, scene.attributes())


def synonym_prompt(scene: Scene, attribute: str, index: int = 1) -> str:
    """The canonical prompt with ``attribute`` named by its ``index``-th synonym."""
    words = scene.attributes()
    names = SYNONYMS[attribute][words[attribute]]
    words[attribute] = names[min(index, len(names) - 1)]
    return fill(CANONICAL_TEMPLATE, words)


def training_prompt(scene: Scene, rng: np.random.Generator) -> str:
    """A random description of ``scene``: random template and a random synonym of each word."""
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    words = {name: str(rng.choice(SYNONYMS[name][value])) for name, value in scene.attributes().items()}
    return fill(template, words)


def vocabulary() -> list[str]:
    """Every word the world's prompts use, sorted (the tokenizers' whole-word vocabulary)."""
    text = " ".join([*TEMPLATES, EMPTY_TEMPLATE, "an"])
    for table in SYNONYMS.values():
        for names in table.values():
            text += " " + " ".join(names)
    words = set(re.findall(r"[a-z]+", re.sub(r"\{[a-z]+\}", " ", text)))
    return sorted(words)


def find_value(attribute: str, text: str) -> str | None:
    """The value of ``attribute`` that ``text`` names (by any synonym), or None."""
    lowered = f" {text.lower()} "
    for value, names in SYNONYMS[attribute].items():
        if any(re.search(rf"\b{re.escape(name)}\b", lowered) for name in names):
            return value
    return None


__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "CANONICAL_TEMPLATE",
    "COLOURS",
    "EMPTY_TEMPLATE",
    "HELD_OUT",
    "OBJECTS",
    "STYLES",
    "SYNONYMS",
    "TEMPLATES",
    "canonical_prompt",
    "fill",
    "find_value",
    "is_held_out",
    "synonym_prompt",
    "training_prompt",
    "vocabulary",
]
