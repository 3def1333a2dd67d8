"""``erasekit demo``: erase a concept from the shipped ShapesCanvas model and measure it.

1. Generate the protocol's evaluation images with the original model (target, synonym and
   in-domain prompts, :mod:`erasekit.toyworld.protocol`) and judge them with the detectors; the
   same for the target and synonym scenes prompted with the anchor instead of the concept
   (:func:`erasekit.toyworld.protocol.anchor_samples`): the UA an exact mapping onto the anchor reaches.
2. Learn a mask with the core method (:func:`erasekit.training.erase`) from the recipe
   :data:`RECIPE` (``erase-recipe.yaml`` beside this file) with the concept's own prompts (disjoint from the evaluation's).
3. Generate the same images, from the same noise, with the mask; judge them again; compare the
   non-target images with the original ones (PSNR, SSIM, latent MSE).
4. Write ``metrics.json``, ``grid.png`` (before/after) and ``report.html`` into the output folder,
   which appears only when everything is written (a temporary sibling renamed at the end).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .. import __version__
from ..config import EraseConfig, load_config
from ..outputs import atomic_directory, check_output, commit_directory
from ..pipeline import apply_masks
from ..training import erase
from . import protocol
from .world import World

#: The recipe the demo erases with: mask, loss and training settings (prompts and sampling come from
#: the protocol and the world). A normal ``erasekit erase --config`` file.
RECIPE = Path(__file__).parent / "erase-recipe.yaml"
#: Noise seeds of the images :func:`closest_value` judges (disjoint from the evaluation's).
ANCHOR_SEED_BASE = 900_000


def closest_value(world: World, concept: str, prompts: list[str]) -> str:
    """The other value of the concept's attribute that the model's own images of ``prompts`` most resemble.

    The detector's class probabilities, averaged over one image per prompt (training seeds, below
    :data:`~erasekit.toyworld.protocol.EVALUATION_SEED_BASE`), with the concept itself and ``none``
    left out: the concept's nearest neighbour in this model.
    """
    attribute, value = protocol.resolve_concept(concept)
    images = world.generate(prompts, [ANCHOR_SEED_BASE + i for i in range(len(prompts))])
    probabilities = world.detectors.predict_proba(images)[attribute].mean(0)
    classes = world.detectors.classes[attribute]
    candidates = [i for i, name in enumerate(classes) if name not in (value, "none")]
    return classes[max(candidates, key=lambda i: float(probabilities[i]))]


def erasure_config(
    world: World, concept: str, overrides: list[str] | None = None, prompts: int = 24, anchor: str | None = None
) -> EraseConfig:
    """The recipe filled in for ``concept`` on ``world``: its prompts, anchors and sampling.

    ``anchor``: what the concept becomes (:func:`erasekit.toyworld.protocol.erasure_prompts`); by
    default, for an object, the object its images most resemble in this model (:func:`closest_value`):
    masks turn a drawn shape into its nearest neighbour with few changes, whereas mapping it to the
    empty background has to switch off shape drawing itself, which every other object shares (circle
    on the first shipped world: in-domain retain accuracy near 80 % with the empty background, 84-90 %
    with its nearest neighbour). A colour, style or background becomes each of the other values in turn
    (red mapped to its nearest neighbour alone erased less there).
    """
    # The world's sampling settings sit under the recipe, so that the recipe (and --set) can train on
    # another trajectory than the one the world samples with; the mask is used with the world's steps.
    base = EraseConfig()
    base.model.id = str(world.pipeline_path)
    for key in ("steps", "resolution", "guidance_scale", "max_sequence_length"):
        setattr(base.sampling, key, world.sampling[key])
    base.sampling.generation_steps = world.sampling["steps"]
    config = load_config(RECIPE, overrides or [], base=base)
    attribute, value = protocol.resolve_concept(concept)
    if anchor is None and attribute == "object":
        concept_prompts, _, _ = protocol.erasure_prompts(concept, count=prompts, seed=config.train.seed)
        anchor = closest_value(world, concept, concept_prompts)
    concept_prompts, anchors, preserve = protocol.erasure_prompts(concept, count=prompts, seed=config.train.seed, anchor=anchor)
    config.concept.concept = value
    config.concept.anchor = {None: f"another {attribute}", "empty": "an empty background"}.get(anchor, anchor)
    config.concept.templates = []
    config.concept.prompts = concept_prompts
    config.concept.target_prompts = anchors
    config.concept.preservation_prompts = preserve
    return config


def _fidelity(before: np.ndarray, after: np.ndarray, latents_before: torch.Tensor, latents_after: torch.Tensor) -> dict[str, float]:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a = torch.from_numpy(before).permute(0, 3, 1, 2).float() / 255
    b = torch.from_numpy(after).permute(0, 3, 1, 2).float() / 255
    psnr = float(peak_signal_noise_ratio(b, a, data_range=1.0))
    return {
        # identical images have no finite PSNR, and JSON has no infinity: null then
        "psnr": psnr if math.isfinite(psnr) else None,
        "ssim": float(structural_similarity_index_measure(b, a, data_range=1.0)),
        "latent_mse": float(torch.mean((latents_after - latents_before) ** 2)),
    }


def _grid(rows: list[tuple[str, np.ndarray]], scale: int = 3) -> Image.Image:
    """Labelled rows of images, upscaled ``scale`` times (nearest neighbour keeps pixels honest)."""
    label_width, pad = 150, 4
    cell = rows[0][1].shape[1] * scale
    columns = max(len(images) for _, images in rows)
    canvas = Image.new("RGB", (label_width + columns * (cell + pad), len(rows) * (cell + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        y = r * (cell + pad)
        draw.text((4, y + cell // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            tile = Image.fromarray(image).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (label_width + c * (cell + pad), y))
    return canvas


def _db(psnr: float | None) -> str:
    return "identical images" if psnr is None else f"{psnr:.2f} dB"


def _report(metrics: dict[str, Any], grid: Image.Image) -> str:
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    picture = base64.b64encode(buffer.getvalue()).decode()
    names = {"ua": "UA", "synonym_ua": "synonym UA", "ira": "IRA", "cra": "CRA"}
    rows = "".join(
        f"<tr><td>{label}</td><td>{metrics['before'][key]:.1%}</td><td>{metrics['after'][key]:.1%}</td></tr>"
        for key, label in names.items()
    )
    fidelity, reference = metrics["fidelity"], metrics["anchor_images"]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>erasekit demo: {html.escape(metrics['concept'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:.3em .8em;text-align:right}} td:first-child{{text-align:left}}</style></head>
<body><h1>Erasing &ldquo;{html.escape(metrics['concept'])}&rdquo; from the ShapesCanvas model</h1>
<p>Method: minimalist mask erasure (erasekit {html.escape(metrics['erasekit_version'])}), the concept
mapped to {html.escape(metrics['anchor'])}; masked
{metrics['masked_fraction']:.2%} of the transformer's units; {metrics['seconds']:.0f} s in all on this machine.</p>
<table><tr><th>metric</th><th>original</th><th>erased</th></tr>{rows}</table>
<p>UA: share of images of the concept in which the detector no longer finds it (synonym UA: prompts naming it
by a synonym). The original model's own images of the anchor prompts, same scenes and noise, score UA
{reference['ua']:.1%} and synonym UA {reference['synonym_ua']:.1%}: an erasure that drew exactly the anchor
would reach those. IRA: other values of the same attribute still drawn correctly. CRA: the other attributes of those
images still correct. Fidelity of the non-target images to the original model, same noise:
PSNR {_db(fidelity['psnr'])}, SSIM {fidelity['ssim']:.4f}, latent MSE {fidelity['latent_mse']:.5f}.</p>
<h2>Before and after, same prompts and noise</h2>
<img src="data:image/png;base64,{picture}" alt="before/after grid">
<h2>All numbers</h2><pre>{html.escape(json.dumps(metrics, indent=2))}</pre>
</body></html>
"""


def run_demo(
    concept: str = "circle",
    output: str | Path = "outputs/demo",
    *,
    world_path: str | Path | None = None,
    per_group: int = protocol.PER_GROUP,
    anchor: str | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Erase ``concept`` from the ShapesCanvas model and write the before/after report to ``output``.

    Args:
        concept: an object, colour, style or background of the world (synonyms accepted).
        output: folder for ``metrics.json``, ``grid.png``, ``report.html`` and the mask (``mask/``).
        world_path: a world folder; default the shipped one.
        per_group: evaluation images per group (target, synonym, in-domain).
        anchor: what the concept becomes: another value of its attribute, or ``"empty"`` for an object
            (default: an object's nearest neighbour in the model, :func:`closest_value`; each other
            value in turn for a colour, style or background).
        overrides: ``key=value`` changes to the recipe (as ``erasekit erase --set``).
        progress: show progress bars.
        overwrite: replace an existing output folder.

    Returns:
        The metrics written to ``metrics.json``.
    """
    started = time.perf_counter()
    attribute, value = protocol.check_anchor(concept, anchor)  # a bad concept or anchor fails before anything is loaded
    target = check_output(output, overwrite=overwrite)
    world = World.load(world_path)
    config = erasure_config(world, concept, overrides, anchor=anchor)
    samples = protocol.evaluation_samples(concept, per_group=per_group)
    prompts, seeds = [s.prompt for s in samples], [s.seed for s in samples]

    tmp = atomic_directory(target)
    try:
        before, latents_before = world.generate(prompts, seeds, progress=progress, desc="original model", return_latents=True)
        predicted_before = world.detectors.predict(before)
        # an object's default anchor is the one erasure_config chose (its nearest neighbour); it names it
        chosen = config.concept.anchor if anchor is None and attribute == "object" else anchor
        references = protocol.anchor_samples(concept, samples, chosen)
        anchor_images = world.generate([s.prompt for s in references], [s.seed for s in references], progress=progress, desc="anchor prompts")
        reference_scores = protocol.score(concept, references, world.detectors.predict(anchor_images))
        result = erase(config, tmp / "mask")
        masked = apply_masks(world.pipe, [tmp / "mask"])
        try:
            after, latents_after = world.generate(prompts, seeds, progress=progress, desc="erased model", return_latents=True)
        finally:
            masked.remove()
        predicted_after = world.detectors.predict(after)
        counts = result.masked_units
        keep = np.array([s.group == "in_domain" for s in samples])
        metrics: dict[str, Any] = {
            "concept": value,
            "attribute": attribute,
            "anchor": config.concept.anchor,
            "before": protocol.score(concept, samples, predicted_before),
            "after": protocol.score(concept, samples, predicted_after),
            # the original model's images of the anchor prompts, same noise: the most an exact mapping reaches
            "anchor_images": {key: reference_scores[key] for key in ("ua", "synonym_ua")},
            "fidelity": _fidelity(before[keep], after[keep], latents_before[torch.from_numpy(keep)], latents_after[torch.from_numpy(keep)]),
            "masked_fraction": result.masked_fraction,
            "masked_units": counts,
            "images_per_group": per_group,
            "sampling": world.sampling,
            "erasure": {"iterations": config.train.iterations, "seconds": round(result.seconds, 3)},
            "erasekit_version": __version__,
        }
        metrics["seconds"] = time.perf_counter() - started
        columns = 8
        rows = []
        for group, label in (("target", "concept"), ("synonym", "synonym"), ("in_domain", "other values")):
            index = [i for i, s in enumerate(samples) if s.group == group][:columns]
            rows.append((f"{label}: original", before[index]))
            if group == "target":  # references hold the target samples first, in order
                rows.append(("concept: anchor prompt", anchor_images[: len(index)]))
            rows.append((f"{label}: erased", after[index]))
        grid = _grid(rows)
        grid.save(tmp / "grid.png")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / "report.html").write_text(_report(metrics, grid), encoding="utf-8")
        commit_directory(tmp, target, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return metrics


def format_table(metrics: dict[str, Any]) -> str:
    """The before/after table the CLI prints."""
    lines = [f"{'metric':<12}{'original':>10}{'erased':>10}"]
    for key, label in (("ua", "UA"), ("synonym_ua", "synonym UA"), ("ira", "IRA"), ("cra", "CRA")):
        lines.append(f"{label:<12}{metrics['before'][key]:>10.1%}{metrics['after'][key]:>10.1%}")
    reference = metrics["anchor_images"]
    lines.append(
        f"the original model's own images of the anchor prompts (what drawing exactly {metrics['anchor']} would score): "
        f"UA {reference['ua']:.1%}, synonym UA {reference['synonym_ua']:.1%}"
    )
    f = metrics["fidelity"]
    lines.append(f"fidelity of other prompts: PSNR {_db(f['psnr'])}, SSIM {f['ssim']:.4f}")
    lines.append(f"masked fraction {metrics['masked_fraction']:.2%}, {metrics['seconds']:.0f} s")
    return "\n".join(lines)
