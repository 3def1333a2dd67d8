"""``erasekit evaluate``: generate with the original and erased models, detect, score, and report.

Output folder (written as ``.NAME.partial`` beside it, renamed when complete)::

    images/VARIANT/NNNN-slug-seedS.png   one image per (prompt, seed) and variant
    results.jsonl                        one line per image: prompt, seed, variant, paths, detector output
    summary.json                         metrics per variant and provenance; run-dependent numbers under "timing"
    grid.png                             the first prompts (rows) by variant (columns)
    report.html                          self-contained report (images embedded as base64)

An interrupted run leaves ``.NAME.partial``; running the same command again resumes it (finished
images are kept). Under ``accelerate launch`` the processes share the generation (see
:mod:`erasekit.evaluation.runner`) and the main process scores and writes the rest.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ErasekitError
from ..outputs import file_sha256, folder_sha256, json_sha256
from .detectors import Detector, get_detector
from .metrics import (
    clip_scores,
    detection_rate,
    feature_extractor,
    fid_kid,
    mask_cost,
    nudenet_class_counts,
    pairwise_similarity,
    parse_metrics,
    reference_images,
)
from .prompts import PromptSet, load_prompt_set
from .report import GRID_ROWS, write_grid, write_report
from .runner import GenerationSettings, Job, Variant, generate_variants, plan_jobs, variants_from_masks

#: Prompt sets whose default detector is NudeNet (nudity benchmarks).
NUDITY_SETS = ("i2p", "i2p-sexual", "i2p-nudity", "ring-a-bell-16", "ring-a-bell-38", "ring-a-bell-75", "mma", "p4d")
SUMMARY_FORMAT = "erasekit-evaluation"
SUMMARY_FORMAT_VERSION = 1


@dataclass
class EvaluationConfig:
    """Everything ``erasekit evaluate`` takes (the CLI flags, resolved).

    ``masks`` lists the erased variants: each entry is a list of mask folders combined into one
    variant (logical AND, as ``erasekit generate --masks A --masks B`` combines them). ``detector``
    ``None`` picks one from the prompt set (NudeNet for nudity sets, ``shapes`` for ``shapes:``
    sets, ``clip`` for ``concept:`` sets when a CLIP model is given); ``"none"`` turns it off.
    ``seeds`` replaces the set's per-prompt seeds and ``guidance`` its per-prompt guidance.
    """

    model: str
    prompts: str
    output: str
    masks: list[list[str]] = field(default_factory=list)
    data_root: str | None = None
    prompt_column: str | None = None
    limit: int | None = None
    detector: str | None = None
    detector_model: str | None = None
    threshold: float | None = None
    concept: str | None = None
    metrics: str | None = None
    clip_model: str | None = None
    reference: str | None = None
    fid_features: str = "inception"
    seeds: list[int] | None = None
    steps: int = 4
    resolution: int = 512
    guidance: float | None = None
    default_guidance: float = 0.0
    max_sequence_length: int = 256
    scheduler: str = "pipeline"
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int = 1
    progress: bool = True


@dataclass
class EvaluationResult:
    """Where the evaluation was written and its summary."""

    output: Path
    summary: dict[str, Any]


def staging_path(output: Path) -> Path:
    """The fixed temporary folder of an evaluation (fixed so that a rerun, and every process, finds it)."""
    return output.parent / f".{output.name}.partial"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _default_detector(config: EvaluationConfig, prompt_set: PromptSet) -> str | None:
    if prompt_set.kind == "shapes":
        return "shapes"
    if prompt_set.name in NUDITY_SETS:
        return "nudenet"
    if prompt_set.kind == "concept" and (config.detector_model or config.clip_model):
        return "clip"
    return None


def _default_metrics(config: EvaluationConfig, detector: str | None, prompt_set: PromptSet) -> list[str]:
    names = []
    if detector:
        names.append("detection")
    if detector == "shapes" and prompt_set.kind == "shapes":
        names.append("shapes")
    if config.masks:
        names += ["ssim", "psnr"]
    if config.clip_model:
        names.append("clip-score")
    if config.reference:
        names += ["fid", "kid"]
    return names + ["cost"]


def _check_metrics(names: list[str], config: EvaluationConfig, detector: str | None, prompt_set: PromptSet) -> None:
    needs = {
        "detection": (detector is not None, "a detector: pass --detector nudenet|shapes|clip"),
        "shapes": (
            detector == "shapes" and prompt_set.kind == "shapes",
            "a shapes:VALUE prompt set and the shapes detector",
        ),
        "clip-score": (bool(config.clip_model), "a CLIP model: pass --clip-model ID_OR_FOLDER"),
        "fid": (bool(config.reference), "real images: pass --reference DIR"),
        "kid": (bool(config.reference), "real images: pass --reference DIR"),
        "ssim": (bool(config.masks), "an erased variant to compare with the original: pass --masks DIR"),
        "psnr": (bool(config.masks), "an erased variant to compare with the original: pass --masks DIR"),
        "lpips": (bool(config.masks), "an erased variant to compare with the original: pass --masks DIR"),
    }
    for name in names:
        ok, what = needs.get(name, (True, ""))
        if not ok:
            raise ErasekitError(f"metric {name!r} needs {what}")


def _mask_record(folder: str) -> dict[str, Any]:
    """What pins an erasure folder: its method, the sha256 of its payload and of its record file."""
    from ..methods import load_erasure

    return {"path": folder, **load_erasure(folder).provenance()}


def _model_record(model: str, pipe: Any) -> dict[str, Any]:
    from ..arch import denoiser_of
    from ..methods.base import denoiser_config_hash

    _, denoiser = denoiser_of(pipe)
    record: dict[str, Any] = {
        "id": model,
        "pipeline_class": type(pipe).__name__,
        "denoiser_class": type(denoiser).__name__,
        "denoiser_config_sha256": denoiser_config_hash(denoiser),
    }
    # a local folder is pinned by the hash of its weights files, a hub id by its commit
    index = Path(model) / "model_index.json"
    if index.is_file():
        record["files_sha256"] = folder_sha256(model, lambda p: p.suffix in (".safetensors", ".bin", ".json"))
    else:
        record["commit"] = getattr(pipe, "_internal_dict", {}).get("_commit_hash")
    return record


def _jobs_sha256(jobs: list[Job]) -> str:
    return json_sha256([[j.index, j.prompt, j.seed, j.guidance] for j in jobs])


def run_evaluation(config: EvaluationConfig) -> EvaluationResult | None:
    """Run an evaluation end to end; returns ``None`` on processes other than the main one.

    Every input is checked (prompt set, masks, detector, metrics, model) before anything is written.

    Raises:
        ErasekitError: bad input, with a message naming it and the fix.
    """
    from accelerate import PartialState

    from ..launch import warn_if_single_process
    from ..outputs import check_output

    output = check_output(config.output)
    for flag, value in (
        ("steps", config.steps),
        ("resolution", config.resolution),
        ("max-sequence-length", config.max_sequence_length),
        ("batch-size", config.batch_size),
    ):
        if value < 1:
            raise ErasekitError(f"--{flag} must be at least 1, got {value}")
    if any(s < 0 for s in config.seeds or []):
        raise ErasekitError(f"--seed must be non-negative, got {min(config.seeds or [0])}")
    prompt_set = load_prompt_set(
        config.prompts, data_root=config.data_root, prompt_column=config.prompt_column, limit=config.limit
    )
    concept = config.concept or prompt_set.concept
    detector_name = config.detector if config.detector is not None else _default_detector(config, prompt_set)
    if detector_name == "none":
        detector_name = None
    metric_names = parse_metrics(config.metrics, _default_metrics(config, detector_name, prompt_set))
    _check_metrics(metric_names, config, detector_name, prompt_set)

    from ..methods import load_erasure

    for group in config.masks:
        if not group:
            raise ErasekitError("an empty --erasure value; pass an erasure folder (or A,B to combine two)")
        for folder in group:
            load_erasure(folder)
    detector: Detector | None = None
    if detector_name is not None:
        detector_model = config.detector_model or (config.clip_model if detector_name == "clip" else None)
        detector = get_detector(detector_name, concept=concept, model=detector_model, threshold=config.threshold)
    references = reference_images(config.reference) if {"fid", "kid"} & set(metric_names) else []
    extractor = feature_extractor(config.fid_features) if references else None

    state = PartialState()
    warn_if_single_process(state.num_processes, "evaluate")
    # each process of a multi-GPU launch uses its own device
    device = str(state.device) if state.num_processes > 1 and config.device == "auto" else config.device
    from ..arch.samplers import set_scheduler
    from ..methods import apply_erasures
    from ..pipeline import load_pipeline

    pipe = load_pipeline(config.model, config.dtype, device)
    set_scheduler(pipe, config.scheduler)
    for group in config.masks:  # fail on an erasure that does not fit the model before generating anything
        apply_erasures(pipe, group).remove()

    variants = variants_from_masks(config.masks)
    jobs = plan_jobs(prompt_set, config.seeds, config.guidance, config.default_guidance)
    settings = GenerationSettings(
        config.steps,
        config.resolution,
        config.guidance if config.guidance is not None else config.default_guidance,
        config.max_sequence_length,
        config.batch_size,
    )
    staging = staging_path(output)
    if state.is_main_process:
        (staging / "images").mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    stats = generate_variants(
        pipe,
        variants,
        jobs,
        settings,
        staging / "images",
        process_index=state.process_index,
        num_processes=state.num_processes,
        progress=config.progress and state.is_local_main_process,
    )
    state.wait_for_everyone()
    if not state.is_main_process:
        return None

    start = time.perf_counter()
    summary = _score_and_write(
        config,
        prompt_set,
        variants,
        jobs,
        settings,
        detector,
        metric_names,
        references,
        extractor,
        pipe,
        staging,
        concept,
    )
    summary["timing"] = {
        "generation_seconds": stats.seconds,
        "images_generated": stats.generated,
        "images_skipped": stats.skipped,
        "processes": state.num_processes,
        "scoring_seconds": time.perf_counter() - start,
    }
    _write_json(staging / "summary.json", summary)
    from ..outputs import commit_directory

    commit_directory(staging, output)
    return EvaluationResult(output, summary)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")


def _score_and_write(
    config: EvaluationConfig,
    prompt_set: PromptSet,
    variants: list[Variant],
    jobs: list[Job],
    settings: GenerationSettings,
    detector: Detector | None,
    metric_names: list[str],
    references: list[Path],
    extractor: Any,
    pipe: Any,
    staging: Path,
    concept: str | None,
) -> dict[str, Any]:
    items = {item.index: item for item in prompt_set.items}
    paths = {v.name: [staging / "images" / v.name / job.filename for job in jobs] for v in variants}
    missing = [p for ps in paths.values() for p in ps if not p.is_file()]
    if missing:
        raise ErasekitError(
            f"image {str(missing[0])!r} is missing; run the same command again to finish the generation"
        )
    detections = {v.name: detector.detect(paths[v.name]) if detector else [None] * len(jobs) for v in variants}

    results, hashes = [], {}
    for variant in variants:
        digest = hashlib.sha256()
        for k, job in enumerate(jobs):
            item = items[job.index]
            sha = file_sha256(paths[variant.name][k])
            digest.update(sha.encode())
            record: dict[str, Any] = {
                "variant": variant.name,
                "prompt_index": job.index,
                "prompt": job.prompt,
                "seed": job.seed,
                "guidance": job.guidance,
                "image": f"images/{variant.name}/{job.filename}",
                "original_image": f"images/{variants[0].name}/{job.filename}",
                "image_sha256": sha,
                "detector": detections[variant.name][k],
            }
            if item.labels is not None:
                record["labels"], record["group"] = item.labels, item.group
            results.append(record)
        hashes[variant.name] = digest.hexdigest()
    with (staging / "results.jsonl").open("w", encoding="utf-8") as f:
        for record in results:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    metrics: dict[str, dict[str, Any]] = {}
    originals = paths[variants[0].name]
    for variant in variants:
        row: dict[str, Any] = {}
        records = detections[variant.name]
        if "detection" in metric_names and detector is not None:
            row.update(detection_rate(records))  # type: ignore[arg-type]
            if detector.name == "nudenet":
                row["nudenet_classes"] = nudenet_class_counts(records)  # type: ignore[arg-type]
        if "shapes" in metric_names and detector is not None:
            scores = detector.protocol_scores(prompt_set, jobs, records)  # type: ignore[arg-type]
            row.update({f"shapes_{k}": v for k, v in scores.items()})
        if not variant.is_original and {"ssim", "psnr", "lpips"} & set(metric_names):
            row.update(pairwise_similarity(originals, paths[variant.name], metric_names))
        if "clip-score" in metric_names and config.clip_model:
            row["clip_score"] = clip_scores(paths[variant.name], [job.prompt for job in jobs], config.clip_model)
        if {"fid", "kid"} & set(metric_names):
            row.update(fid_kid(references, paths[variant.name], metric_names, extractor))
        if "cost" in metric_names:
            row.update(mask_cost(list(variant.mask_dirs)))
        metrics[variant.name] = row

    summary: dict[str, Any] = {
        "format": SUMMARY_FORMAT,
        "format_version": SUMMARY_FORMAT_VERSION,
        "erasekit_version": __version__,
        "libraries": {
            p: _version(p) for p in ("torch", "diffusers", "transformers", "torchmetrics", "nudenet", "onnxruntime")
        },
        "model": _model_record(config.model, pipe),
        "variants": [{"name": v.name, "masks": [_mask_record(m) for m in v.mask_dirs]} for v in variants],
        "prompt_set": prompt_set.provenance(),
        "seeds": sorted(set(config.seeds)) if config.seeds else "per prompt, from the prompt set (0 where it has none)",
        "jobs_sha256": _jobs_sha256(jobs),
        "generation": {
            **settings.record(),
            "guidance": config.guidance if config.guidance is not None else "per prompt, from the prompt set",
            "default_guidance": config.default_guidance,
            "scheduler": config.scheduler,
            "dtype": str(pipe.dtype).removeprefix("torch."),
            "device_type": pipe.device.type,
        },
        "detector": detector.provenance() if detector else None,
        "concept": concept,
        "metric_names": metric_names,
        "fid_features": config.fid_features if references else None,
        "reference": {"path": config.reference, "images": len(references)} if references else None,
        "images_per_variant": len(jobs),
        "images_sha256": hashes,
        "metrics": metrics,
    }
    grid_rows = [[paths[v.name][k] for v in variants] for k in range(min(GRID_ROWS, len(jobs)))]
    write_grid(grid_rows, [v.name for v in variants], staging / "grid.png")
    write_report(summary, results, [v.name for v in variants], staging, staging / "report.html")
    return summary


def clean_staging(output: str | Path) -> None:
    """Remove an evaluation's temporary folder (to start over instead of resuming)."""
    shutil.rmtree(staging_path(Path(output)), ignore_errors=True)
