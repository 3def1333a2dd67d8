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


def read_prompt_file(path: str | Path, what: str = "prompt") -> list[str]:
    """One prompt (or ``what``) per non-empty line; a missing or empty file is a :class:`PromptError`."""
    file = Path(path)
    if not file.is_file():
        raise PromptError(f"{what} file {str(file)!r} does not exist")
    try:
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise PromptError(f"{what} file {str(file)!r} is not UTF-8 text") from None
    prompts = [line for line in lines if line]
    if not prompts:
        raise PromptError(f"{what} file {str(file)!r} is empty; put one {what.removesuffix('s')} per line")
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


def concept_entries(cfg: ConceptConfig) -> list[tuple[str, str]]:
    """Every concept ``cfg`` erases with its anchor, in order: ``(concept, anchor)`` first, then
    ``more_concepts`` paired with ``more_anchors`` (each with ``anchor`` when that list is empty).

    Raises:
        PromptError: an empty concept, anchors that do not pair with the concepts, a concept given twice.
    """
    concept = cfg.concept.strip()
    if not concept:
        raise PromptError("the concept is empty; pass --concept TEXT (e.g. --concept nudity)")
    more = [c.strip() for c in cfg.more_concepts]
    if any(not c for c in more):
        raise PromptError("one of the concepts is empty; give every --concept (or concepts-file line) a text")
    if cfg.more_anchors and len(cfg.more_anchors) != len(more):
        raise PromptError(
            f"{len(cfg.more_anchors) + 1} anchors for {len(more) + 1} concepts; "
            "give one anchor per concept (in order), or one for all"
        )
    entries = [(concept, cfg.anchor), *zip(more, cfg.more_anchors or [cfg.anchor] * len(more))]
    seen: set[str] = set()
    for name, _ in entries:
        if name.casefold() in seen:
            raise PromptError(f"the concept {name!r} is given twice; name each concept once")
        seen.add(name.casefold())
    return entries


def _naming(cfg: ConceptConfig) -> tuple[list[list[str]], re.Pattern[str], list[str]]:
    """Per concept its names (the first concept's synonyms with it), one pattern finding any of them as
    :func:`concept_pattern` does, and the anchor of each of the pattern's groups (one group per name)."""
    entries = concept_entries(cfg)
    names = [concept_names(cfg), *([name] for name, _ in entries[1:])]
    owned = sorted(
        ((n, anchor) for ns, (_, anchor) in zip(names, entries) for n in ns),
        key=lambda pair: len(pair[0]),
        reverse=True,
    )
    alternatives = "|".join(f"({re.escape(n)})" for n, _ in owned)
    pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
    return names, pattern, [anchor.strip() for _, anchor in owned]


def build_concept_prompts(cfg: ConceptConfig) -> ConceptPrompts:
    """Expand templates over every concept and its names; pair each prompt with its target.

    The prompts run template by template, each over the concepts in order (the first concept's synonyms
    after it), so that consecutive prompts take the concepts in turn; ``prompts`` follow. The target of a
    prompt is, by default, the same prompt with each concept (or synonym) it names replaced by that
    concept's anchor (dropped when the anchor is empty), all in one pass (an anchor that names another
    concept stays as it is); ``target_prompts`` overrides that, one per concept prompt.
    """
    names, pattern, anchors = _naming(cfg)
    prompts = [_tidy(t.format(concept=n)) for t in cfg.templates for ns in names for n in ns]
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
        targets = []
        for prompt in prompts:
            found = pattern.search(prompt)
            if not found:
                named = " or ".join(repr(ns[0]) for ns in names)
                raise PromptError(
                    f"concept prompt {prompt!r} does not mention {named}; give concept.target_prompts for such prompts"
                )
            first = anchors[found.lastindex - 1] if found.lastindex else ""
            replaced = pattern.sub(lambda m: anchors[m.lastindex - 1] if m.lastindex else "", prompt)
            targets.append(_tidy(replaced) or first)
    preservation = [_tidy(p) for p in cfg.preservation_prompts if p.strip()]
    if cfg.preservation_file:
        preservation += read_prompt_file(cfg.preservation_file)
    if not preservation:
        raise PromptError("no preservation prompts: set concept.preservation_prompts or concept.preservation_file")
    return ConceptPrompts(concept=prompts, target=targets, preservation=preservation)


def read_concepts_file(path: str | Path) -> list[tuple[str, str | None]]:
    """The concepts of a concepts file: one per non-empty line, ``concept`` or ``concept => anchor``
    (``None``: the line names no anchor); lines starting with ``#`` are comments.

    Raises:
        PromptError: a missing, unreadable or empty file, or a line with an empty concept.
    """
    entries: list[tuple[str, str | None]] = []
    for line in read_prompt_file(path, what="concepts"):
        if line.startswith("#"):
            continue
        concept, arrow, anchor = line.partition("=>")
        if not concept.strip():
            raise PromptError(f"concepts file {str(path)!r}: the line {line!r} names no concept before '=>'")
        entries.append((concept.strip(), anchor.strip() if arrow else None))
    if not entries:
        raise PromptError(f"concepts file {str(path)!r} names no concept; put one concept per line")
    return entries
