"""Concept specs and prompt sets."""

from .concepts import (
    ConceptPrompts,
    build_concept_prompts,
    concept_entries,
    concept_names,
    concept_pattern,
    read_concepts_file,
    read_prompt_file,
    retarget,
)

__all__ = [
    "ConceptPrompts",
    "build_concept_prompts",
    "concept_entries",
    "concept_names",
    "concept_pattern",
    "read_concepts_file",
    "read_prompt_file",
    "retarget",
]
