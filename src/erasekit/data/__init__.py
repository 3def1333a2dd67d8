"""Concept specs and prompt sets."""

from .concepts import ConceptPrompts, build_concept_prompts, read_prompt_file

__all__ = ["ConceptPrompts", "build_concept_prompts", "read_prompt_file"]
