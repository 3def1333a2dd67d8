"""Evaluation of erased models: prompt sets, generation of original and erased images, detectors, metrics, report.

The entry point is :func:`run_evaluation` (``erasekit evaluate``); see ``docs/evaluation.md``.
"""

from .detectors import (
    DETECTORS,
    NUDENET_CLASSES,
    NUDENET_THRESHOLD,
    Detector,
    detector_factory,
    detector_prompt_set,
    get_detector,
)
from .evaluate import EvaluationConfig, EvaluationResult, run_evaluation, staging_path
from .metrics import METRICS, parse_metrics
from .prompts import CONCEPT_TEMPLATES, FILE_SETS, HUB_SETS, PromptItem, PromptSet, load_prompt_set, resolve_data_root
from .runner import GenerationSettings, Job, Variant, generate_variants, plan_jobs, variants_from_masks

__all__ = [
    "CONCEPT_TEMPLATES",
    "DETECTORS",
    "FILE_SETS",
    "HUB_SETS",
    "METRICS",
    "NUDENET_CLASSES",
    "NUDENET_THRESHOLD",
    "Detector",
    "EvaluationConfig",
    "EvaluationResult",
    "GenerationSettings",
    "Job",
    "PromptItem",
    "PromptSet",
    "Variant",
    "detector_factory",
    "detector_prompt_set",
    "generate_variants",
    "get_detector",
    "load_prompt_set",
    "parse_metrics",
    "plan_jobs",
    "resolve_data_root",
    "run_evaluation",
    "staging_path",
    "variants_from_masks",
]
