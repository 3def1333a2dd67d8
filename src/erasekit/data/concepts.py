"""Concept prompts, their targets, and preservation prompts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..config import ConceptConfig
from ..errors import PromptError


@dataclass
class ConceptPrompts:
    """Concept prompts paired with their targets, and preservation prompts."""

    concept: list[str]
    target: list[str]
    preservation: list[str]


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per non-empty line; a missing or empty file is a :class:`PromptError`."""
    file = Path(path)
    if not file.is_file():
        raise PromptError(f"prompt file {str(file)!r} does not exist")
    try:
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise PromptError(f"prompt file {str(file)!r} is not UTF-8 text") from None
    prompts = [line for line in lines if line]
    if not prompts:
        raise PromptError(f"prompt file {str(file)!r} is empty; put one prompt per line")
    return prompts


def _tidy(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def concept_names(cfg: ConceptConfig) -> list[str]:
    """The concept and its synonyms, stripped, the concept first (empty entries dropped)."""
    return [n for n in [cfg.concept.strip()] + [s.strip() for s in cfg.synonyms] if n]


def concept_pattern(names: list[str]) -> re.Pattern[str]:
    """Where a prompt names any of ``names`` as a whole word (case-insensitive, the longest name first): the rule
    by which a concept prompt's target replaces the concept with the anchor. Whole words: "red" must not
    match inside "checkered"."""
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def retarget(prompt: str, pattern: re.Pattern[str], anchor: str) -> str:
    """``prompt`` with every match of ``pattern`` (:func:`concept_pattern`) replaced by ``anchor`` (dropped when
    it is empty), tidied; the anchor alone when nothing else is left."""
    return _tidy(pattern.sub(anchor.strip(), prompt)) or anchor.strip()


def build_concept_prompts(cfg: ConceptConfig) -> ConceptPrompts:
    """Expand templates over the concept and its synonyms; pair each prompt with its target.

    The target of a prompt is, by default, the same prompt with the concept (or synonym) replaced
    by the anchor (dropped when the anchor is empty); ``target_prompts`` overrides that, one per
    concept prompt.
    """
    concept = cfg.concept.strip()
    if not concept:
        raise PromptError("the concept is empty; pass --concept TEXT (e.g. --concept nudity)")
    names = concept_names(cfg)
    prompts = [_tidy(t.format(concept=n)) for t in cfg.templates for n in names]
    prompts += [_tidy(p) for p in cfg.prompts if p.strip()]
    if not prompts:
        raise PromptError("no concept prompts: give concept.templates containing {concept} or concept.prompts")
    if cfg.target_prompts:
        if len(cfg.target_prompts) != len(prompts):
            raise PromptError(
                f"concept.target_prompts has {len(cfg.target_prompts)} entries "
                f"but there are {len(prompts)} concept prompts"
            )
        targets = [_tidy(t) for t in cfg.target_prompts]
    else:
        pattern = concept_pattern(names)
        targets = []
        for prompt in prompts:
            if not pattern.search(prompt):
                raise PromptError(
                    f"concept prompt {prompt!r} does not mention {concept!r}; "
                    "give concept.target_prompts for such prompts"
                )
            targets.append(retarget(prompt, pattern, cfg.anchor))
    preservation = [_tidy(p) for p in cfg.preservation_prompts if p.strip()]
    if cfg.preservation_file:
        preservation += read_prompt_file(cfg.preservation_file)
    if not preservation:
        raise PromptError("no preservation prompts: set concept.preservation_prompts or concept.preservation_file")
    return ConceptPrompts(concept=prompts, target=targets, preservation=preservation)
