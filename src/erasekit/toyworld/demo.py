"""``erasekit demo``: erase a concept from the shipped ShapesCanvas model and measure it.

1. Generate the protocol's evaluation images with the original model (target, synonym and
   in-domain prompts, :mod:`erasekit.toyworld.protocol`) and judge them with the detectors; the
   same for the target and synonym scenes prompted with the anchor instead of the concept
   (:func:`erasekit.toyworld.protocol.anchor_samples`): the UA an exact mapping onto the anchor reaches.
2. Learn a mask with the core method (:func:`erasekit.training.erase`) from the recipe
   :data:`RECIPE` (``erase-recipe.yaml`` beside this file) with the concept's own prompts
   (disjoint from the evaluation's).
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
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from .. import __version__
from ..config import EraseConfig, load_config
from ..errors import ErasekitError
from ..methods import apply_erasures, erase, get_method
from ..outputs import atomic_directory, check_output, commit_directory
from ..reproducibility import numerics_record
from . import protocol
from .geometry import GeometricJudge
from .image_cache import original_images
from .world import World

#: The recipe the demo erases with: mask, loss and training settings (prompts and sampling come from
#: the protocol and the world). A normal ``erasekit erase --config`` file.
RECIPE = Path(__file__).parent / "erase-recipe.yaml"
#: Noise seeds of the images :func:`closest_value` judges (disjoint from the evaluation's).
ANCHOR_SEED_BASE = 900_000


def closest_value(world: World, concept: str, prompts: list[str], exclude: Sequence[str] = ()) -> str:
    """The other value of the concept's attribute that the model's own images of ``prompts`` most resemble.

    The detector's class probabilities, averaged over one image per prompt (training seeds, below
    :data:`~erasekit.toyworld.protocol.EVALUATION_SEED_BASE`), with the concept itself, ``none`` and the
    values in ``exclude`` (the other concepts erased with it) left out: the concept's nearest neighbour
    in this model.
    """
    attribute, value = protocol.resolve_concept(concept)
    images, _ = original_images(world, prompts, [ANCHOR_SEED_BASE + i for i in range(len(prompts))])
    probabilities = world.detectors.predict_proba(images)[attribute].mean(0)
    classes = world.detectors.classes[attribute]
    candidates = [i for i, name in enumerate(classes) if name not in (value, "none", *exclude)]
    return classes[max(candidates, key=lambda i: float(probabilities[i]))]


def as_concepts(
    concept: str | Sequence[str], anchor: str | None | Sequence[str | None] = None
) -> tuple[list[str], list[str | None]]:
    """The concepts of a demo and their anchors as two lists of one length, checked
    (:func:`~erasekit.toyworld.protocol.check_concepts`): one anchor (or None) is every concept's.

    Raises:
        ErasekitError: no concept, anchors that do not pair with the concepts, or what
            :func:`~erasekit.toyworld.protocol.check_concepts` refuses.
    """
    concepts = [concept] if isinstance(concept, str) else list(concept)
    anchors = [anchor] if anchor is None or isinstance(anchor, str) else list(anchor)
    if not concepts:
        raise ErasekitError("no concept to erase; name one, e.g. circle")
    if len(anchors) == 1:
        anchors = anchors * len(concepts)
    if len(anchors) != len(concepts):
        raise ErasekitError(
            f"{len(anchors)} anchors for {len(concepts)} concepts; "
            "give one anchor per concept (in order), or one for all"
        )
    protocol.check_concepts(concepts, anchors)
    return concepts, anchors


def _interleaved(lists: list[list[str]]) -> list[str]:
    """The items of equally long ``lists`` taken in turn (the first of each, then the second of each, ...)."""
    return [item for row in zip(*lists, strict=True) for item in row]


def erasure_config(
    world: World,
    concept: str | Sequence[str],
    overrides: list[str] | None = None,
    prompts: int = 24,
    anchor: str | None | Sequence[str | None] = None,
) -> EraseConfig:
    """The recipe filled in for ``concept`` on ``world``: its prompts, anchors and sampling.

    Several concepts (values of one attribute, each with its anchor, :func:`as_concepts`) are erased by one
    fit: each gets ``prompts`` concept prompts with its targets, and its preservation prompts keep the
    values none of them is; the lists take the concepts in turn.

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
    concepts, anchors = as_concepts(concept, anchor)
    erased = [protocol.resolve_concept(c)[1] for c in concepts]
    values, names, concept_prompts, target_prompts, preserve = [], [], [], [], []
    for concept_, anchor_ in zip(concepts, anchors):
        attribute, value = protocol.resolve_concept(concept_)
        exclude = [v for v in erased if v != value]
        if anchor_ is None and attribute == "object":
            drawn, _, _ = protocol.erasure_prompts(concept_, count=prompts, seed=config.train.seed, exclude=exclude)
            anchor_ = closest_value(world, concept_, drawn, exclude)
        drawn, targets, kept = protocol.erasure_prompts(
            concept_, count=prompts, seed=config.train.seed, anchor=anchor_, exclude=exclude
        )
        values.append(value)
        names.append({None: f"another {attribute}", "empty": "an empty background"}.get(anchor_, anchor_))
        concept_prompts.append(drawn)
        target_prompts.append(targets)
        preserve.append(kept)
    config.concept.concept, config.concept.more_concepts = values[0], values[1:]
    config.concept.anchor, config.concept.more_anchors = names[0], names[1:]
    config.concept.templates = []
    config.concept.prompts = _interleaved(concept_prompts)
    config.concept.target_prompts = _interleaved(target_prompts)
    config.concept.preservation_prompts = _interleaved(preserve)
    return config


def fidelity(
    before: np.ndarray, after: np.ndarray, latents_before: torch.Tensor, latents_after: torch.Tensor
) -> dict[str, float]:
    """PSNR and SSIM of ``after`` against ``before`` (uint8 images, N x H x W x 3) and the latents' MSE."""
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


def _grid(sections: list[tuple[str, list[str], list[tuple[str, np.ndarray]]]], scale: int = 3) -> Image.Image:
    """Captioned rows of images, upscaled ``scale`` times (nearest neighbour keeps pixels honest).

    Each section is ``(title, column captions, rows)``: the title and each column's caption (its
    prompt, wrapped) above the section's rows, each row labelled on the left.
    """
    label_width, pad, line = 150, 4, 11
    cell = sections[0][2][0][1].shape[1] * scale
    wrap = max(8, cell // 6)  # characters of the default bitmap font per cell
    columns = max(len(images) for _, _, rows in sections for _, images in rows)
    wrapped = [[textwrap.wrap(c, wrap)[:5] for c in captions] for _, captions, _ in sections]
    heads = [line * (1 + max((len(w) for w in ws), default=0)) + pad for ws in wrapped]
    height = sum(head + len(rows) * (cell + pad) for head, (_, _, rows) in zip(heads, sections))
    canvas = Image.new("RGB", (label_width + columns * (cell + pad), height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for head, ws, (title, _, rows) in zip(heads, wrapped, sections):
        draw.text((4, y + 2), title, fill="black")
        for c, caption in enumerate(ws):
            for k, text in enumerate(caption):
                draw.text((label_width + c * (cell + pad), y + line * (k + 1)), text, fill="dimgray")
        y += head
        for label, images in rows:
            draw.text((4, y + cell // 2 - 6), label, fill="black")
            for c, image in enumerate(images):
                tile = Image.fromarray(image).resize((cell, cell), Image.NEAREST)
                canvas.paste(tile, (label_width + c * (cell + pad), y))
            y += cell + pad
    return canvas


#: What the README asks of an erasure on this world: (key, label, bar, whether the bar is relative to the
#: original's value). UA and synonym UA are counted strictly where the metrics have the strict numbers.
BAR = (
    ("ua", "UA", 0.95, False),
    ("synonym_ua", "synonym UA", 0.90, False),
    ("ira", "IRA", 0.95, True),
    ("cra", "CRA", 0.95, True),
)
#: The largest share of masked units the bar allows.
MASKED_BAR = 0.05


def bar_checks(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Each number of the bar: its value after erasure, the bar it must reach, and whether it does.

    UA and synonym UA are the strict ones (no judge finds the concept) where ``metrics`` has them.
    """
    checks = []
    for key, label, bar, relative in BAR:
        need = bar * metrics["before"][key] if relative else bar
        strict = f"strict_{key}"
        if strict in metrics["after"]:
            key, label = strict, f"strict {label}"
        value = metrics["after"][key]
        rule = f">= {bar:.0%} of the original's ({need:.1%})" if relative else f">= {bar:.0%}"
        checks.append({"metric": label, "key": key, "value": value, "bar": need, "rule": rule, "holds": value >= need})
    fraction = metrics.get("masked_fraction")
    if fraction is None:  # a method that masks no units: the bar's share of masked units does not apply
        return checks
    checks.append(
        {
            "metric": "masked",
            "key": "masked_fraction",
            "value": fraction,
            "bar": MASKED_BAR,
            "rule": f"<= {MASKED_BAR:.0%}",
            "holds": fraction <= MASKED_BAR,
        }
    )
    return checks


def _table(metrics: dict[str, Any]) -> list[tuple[str, float | None, float, str, bool | None]]:
    """Rows ``(metric, original, erased, bar, holds)``: the bar's numbers, then the detector's own UA and
    the judges' disagreement beside the strict UA (no bar: ``holds`` None)."""
    before, after = metrics["before"], metrics["after"]
    rows = [(c["metric"], before.get(c["key"]), c["value"], c["rule"], c["holds"]) for c in bar_checks(metrics)]
    if "strict_ua" in after:
        for key, label in (
            ("ua", "UA (detector alone)"),
            ("synonym_ua", "synonym UA (detector alone)"),
            ("ambiguous", "ambiguous (judges disagree)"),
        ):
            rows.append((label, before[key], after[key], "", None))
    return rows


def _verdict(checks: list[dict[str, Any]]) -> str:
    missed = [c["metric"] for c in checks if not c["holds"]]
    return "every number meets the bar" if not missed else f"below the bar: {', '.join(missed)}"


def _holds(holds: bool | None, no: str) -> str:
    return "" if holds is None else "yes" if holds else no


def _db(psnr: float | None) -> str:
    return "identical images" if psnr is None else f"{psnr:.2f} dB"


def _method_line(metrics: dict[str, Any]) -> str:
    method = metrics.get("method", "mask")
    return "minimalist mask erasure" if "masked_fraction" in metrics else f"{method} ({get_method(method).summary})"


def _changed(metrics: dict[str, Any]) -> str:
    if "masked_fraction" in metrics:
        return f"masked {metrics['masked_fraction']:.2%} of the transformer's units"
    return f"changed: {metrics.get('cost', {}).get('changes', '?')}"


def _concept_html(metrics: dict[str, Any]) -> str:
    """One concept's table of numbers and the paragraph that explains them."""
    rows = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{'' if original is None else f'{original:.1%}'}</td>"
        f"<td>{erased:.1%}</td>"
        f"<td>{html.escape(rule)}</td><td>{_holds(holds, '<b>no</b>')}</td></tr>"
        for label, original, erased, rule, holds in _table(metrics)
    )
    fidelity, reference = metrics["fidelity"], metrics["anchor_images"]
    head = "<tr><th>metric</th><th>original</th><th>erased</th><th>bar</th><th>meets it</th></tr>"
    return f"""<table>{head}{rows}</table>
<p>UA: share of images of the concept in which the detector no longer finds it (synonym UA: prompts naming it
by a synonym); strict UA: in which no judge ({html.escape(", ".join(metrics["after"].get("judges", ["detector"])))})
finds it; ambiguous: in which the judges disagree. The original model's own images of the anchor prompts, \
same scenes and noise, score UA
{reference["ua"]:.1%} and synonym UA {reference["synonym_ua"]:.1%}: an erasure that drew exactly the anchor
would reach those. IRA: other values of the same attribute still drawn correctly. CRA: the other attributes of those
images still correct. Fidelity of the non-target images to the original model, same noise:
PSNR {_db(fidelity["psnr"])}, SSIM {fidelity["ssim"]:.4f}, latent MSE {fidelity["latent_mse"]:.5f}.</p>
"""


def _report(metrics: dict[str, Any], grid: Image.Image) -> str:
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    picture = base64.b64encode(buffer.getvalue()).decode()
    blocks = concept_metrics(metrics)
    names = " and ".join(f"&ldquo;{html.escape(b['concept'])}&rdquo;" for b in blocks)
    if len(blocks) == 1:
        mapped = f"the concept mapped to {html.escape(metrics['anchor'])}"
        verdict = _verdict(bar_checks(metrics))
        body = _concept_html(metrics)
    else:
        mapped = (
            "each concept mapped to its anchor ("
            + ", ".join(f"{html.escape(b['concept'])} to {html.escape(b['anchor'])}" for b in blocks)
            + "), by one erasure"
        )
        verdict = _set_line(metrics["set"])
        body = "".join(
            f"<h2>{html.escape(b['concept'])} &rarr; {html.escape(b['anchor'])}</h2>"
            f"<p>{html.escape(_verdict(bar_checks(b)))}.</p>{_concept_html(b)}"
            for b in blocks
        )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>erasekit demo: {html.escape(", ".join(b["concept"] for b in blocks))}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:.3em .8em;text-align:right}} td:first-child{{text-align:left}}</style></head>
<body><h1>Erasing {names} from the ShapesCanvas model</h1>
<p>Method: {html.escape(_method_line(metrics))} (erasekit {html.escape(metrics["erasekit_version"])}), {mapped};
{html.escape(_changed(metrics))}; {metrics["seconds"]:.0f} s in all on this machine.</p>
<p>The bar (README): strict UA &ge; 95 %, strict synonym UA &ge; 90 %, IRA and CRA &ge; 95 % of the original's, at
most 5 % of the units masked. This run: {html.escape(verdict)}.</p>
{body}<h2>Before and after, same prompts and noise</h2>
<p>Each column is one evaluation sample: its prompt above it, the original model's image, then (for the concept) the
original model's image of the anchor prompt from the same noise, then the erased model's image.</p>
<img src="data:image/png;base64,{picture}" alt="before/after grid">
<h2>All numbers</h2><pre>{html.escape(json.dumps(metrics, indent=2))}</pre>
</body></html>
"""


def judge(world: World, concept: str, samples: list[protocol.Sample], images: np.ndarray) -> dict[str, Any]:
    """The protocol's scores of ``images`` (:func:`~erasekit.toyworld.protocol.score`, by the world's detectors)
    and the strict ones (:func:`~erasekit.toyworld.protocol.strict_score`): the second network judge (trained
    with in-between shapes, where the world has one) and, for an object, the geometric judge
    (:class:`~erasekit.toyworld.geometry.GeometricJudge`) must find the concept absent too."""
    attribute, value = protocol.resolve_concept(concept)
    predicted = world.detectors.predict(images)
    scores: dict[str, Any] = protocol.score(concept, samples, predicted)
    found = {"detector": [p == value for p in predicted[attribute]]}
    if world.morph_detectors is not None:
        found["morph_detector"] = [p == value for p in world.morph_detectors.predict(images)[attribute]]
    if attribute == "object":
        drawn = [i for i, s in enumerate(samples) if s.group != "in_domain"]  # only the concept's scenes need it
        flags = dict(zip(drawn, _geometric_judge().finds(images[drawn], value)))
        found["geometric"] = [flags.get(i, False) for i in range(len(samples))]
    scores.update(protocol.strict_score(concept, samples, found))
    return scores


_GEOMETRIC: GeometricJudge | None = None


def _geometric_judge() -> GeometricJudge:
    global _GEOMETRIC
    if _GEOMETRIC is None:  # its templates take a second to draw
        _GEOMETRIC = GeometricJudge()
    return _GEOMETRIC


def run_demo(
    concept: str | Sequence[str] = "circle",
    output: str | Path = "outputs/demo",
    *,
    world_path: str | Path | None = None,
    per_group: int = protocol.PER_GROUP,
    anchor: str | None | Sequence[str | None] = None,
    overrides: list[str] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    world: World | None = None,
    method: str = "mask",
) -> dict[str, Any]:
    """Erase ``concept`` from the ShapesCanvas model and write the before/after report to ``output``.

    Args:
        concept: an object, colour, style or background of the world (synonyms accepted); or several values
            of one attribute, erased by one fit and each scored by the protocol, its in-domain images drawn
            from the values none of them is (``metrics.json`` then holds ``per_concept`` and the ``set``'s
            worst numbers).
        output: folder for ``metrics.json``, ``grid.png``, ``report.html``, ``images.safetensors`` (the
            original, erased and anchor-prompt images as uint8) and the mask (``mask/``).
        world_path: a world folder; default the shipped one.
        per_group: evaluation images per group (target, synonym, in-domain), per concept.
        anchor: what the concept becomes: another value of its attribute, or ``"empty"`` for an object
            (default: an object's nearest neighbour in the model, :func:`closest_value`; each other
            value in turn for a colour, style or background); with several concepts, one per concept in
            order, or one for all.
        overrides: ``key=value`` changes to the recipe (as ``erasekit erase --set``).
        progress: show progress bars.
        overwrite: replace an existing output folder.
        world: an already loaded world (then ``world_path`` is ignored).
        method: the erasure method (``erasekit methods``); its artefact is written to ``output/METHOD/``.

    Returns:
        The metrics written to ``metrics.json``.
    """
    started = time.perf_counter()
    # a bad concept or anchor, or an unknown method, fails before anything is loaded
    concepts, anchors = as_concepts(concept, anchor)
    get_method(method).check_concepts(len(concepts))
    target = check_output(output, overwrite=overwrite)
    world = world or World.load(world_path)
    config = erasure_config(world, concepts, overrides, anchor=anchors)
    config.method = method
    values = [protocol.resolve_concept(c)[1] for c in concepts]
    chosen_names = [config.concept.anchor, *config.concept.more_anchors]
    draws = [
        protocol.evaluation_samples(c, per_group=per_group, exclude=[v for v in values if v != value])
        for c, value in zip(concepts, values)
    ]
    samples = [s for draw in draws for s in draw]
    prompts, seeds = [s.prompt for s in samples], [s.seed for s in samples]

    keep = np.array([s.group == "in_domain" for s in samples])
    tmp = atomic_directory(target)
    try:
        # the original model's images come from the image cache when it holds them
        # (they depend on nothing an erasure changes)
        before, latents_before = original_images(
            world, prompts, seeds, latent_rows=np.flatnonzero(keep).tolist(), progress=progress, desc="original model"
        )
        references = []
        for c, a, value, name, draw in zip(concepts, anchors, values, chosen_names, draws):
            # an object's default anchor is the one erasure_config chose (its nearest neighbour); it names it
            chosen = name if a is None and protocol.resolve_concept(c)[0] == "object" else a
            references.append(protocol.anchor_samples(c, draw, chosen, exclude=[v for v in values if v != value]))
        anchor_images, _ = original_images(
            world,
            [s.prompt for r in references for s in r],
            [s.seed for r in references for s in r],
            progress=progress,
            desc="anchor prompts",
        )
        erasure = erase(config, tmp / method)
        masked = apply_erasures(world.pipe, [tmp / method])
        try:
            after, latents_after = world.generate(
                prompts, seeds, progress=progress, desc="erased model", return_latents=True
            )
        finally:
            masked.remove()
        blocks = []
        start, anchor_start, kept_before = 0, 0, 0
        for c, value, name, draw, reference in zip(concepts, values, chosen_names, draws, references):
            rows = slice(start, start + len(draw))
            kept = keep[rows]
            drawn = slice(anchor_start, anchor_start + len(reference))
            kept_latents = slice(kept_before, kept_before + int(kept.sum()))
            reference_scores = protocol.score(c, reference, world.detectors.predict(anchor_images[drawn]))
            blocks.append(
                {
                    "concept": value,
                    "attribute": protocol.resolve_concept(c)[0],
                    "anchor": name,
                    "before": judge(world, c, draw, before[rows]),
                    "after": judge(world, c, draw, after[rows]),
                    # the original model's images of the anchor prompts, same noise: the most an exact mapping reaches
                    "anchor_images": {key: reference_scores[key] for key in ("ua", "synonym_ua")},
                    "fidelity": fidelity(
                        before[rows][kept],
                        after[rows][kept],
                        latents_before[kept_latents],
                        latents_after[rows][torch.from_numpy(kept)],
                    ),
                }
            )
            start, anchor_start, kept_before = rows.stop, drawn.stop, kept_latents.stop
        common: dict[str, Any] = {
            **erasure.report(),  # the method's own numbers (a mask: masked fraction, units and sha256)
            "images_per_group": per_group,
            "sampling": world.sampling,
            "erasure": {
                # what the fit ran (a method's section may set its own length), for a method that trains
                **(
                    {"iterations": erasure.record.get("settings", {}).get("train", {}).get("iterations")}
                    if get_method(method).trains
                    else {}
                ),
                "seed": config.train.seed,
                "seconds": round(erasure.cost.seconds, 3),
            },
            "numerics": numerics_record(),
            "erasekit_version": __version__,
            "method": method,
            "cost": erasure.cost.to_dict(),
        }
        if len(blocks) == 1:
            metrics: dict[str, Any] = {**blocks[0], **common}
        else:
            per_concept = {block["concept"]: {**block, "bar": bar_checks({**block, **common})} for block in blocks}
            metrics = {
                "concepts": values,
                "attribute": blocks[0]["attribute"],
                "anchors": chosen_names,
                "per_concept": per_concept,
                **common,
            }
        metrics["seconds"] = time.perf_counter() - started
        if len(blocks) == 1:
            metrics["bar"] = bar_checks(metrics)
        else:
            metrics["set"] = set_summary(metrics)
        columns = 8
        sections = []
        for k, (value, name, draw) in enumerate(zip(values, chosen_names, draws)):
            offset = sum(len(d) for d in draws[:k])
            anchor_offset = sum(len(r) for r in references[:k])
            for group, label in (("target", "concept"), ("synonym", "synonym"), ("in_domain", "other values")):
                index = [offset + i for i, s in enumerate(draw) if s.group == group][:columns]
                rows_ = [("original", before[index])]
                if group == "target":  # references hold the target samples first, in order
                    rows_.append((f"anchor prompt ({name})", anchor_images[anchor_offset : anchor_offset + len(index)]))
                rows_.append(("erased", after[index]))
                title = f"{label} prompts:" if len(draws) == 1 else f"{value}: {label} prompts:"
                sections.append((title, [samples[i].prompt for i in index], rows_))
        grid = _grid(sections)
        grid.save(tmp / "grid.png")
        images = {"original": before, "erased": after, "anchor": anchor_images}
        save_file(
            {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in images.items()}, str(tmp / "images.safetensors")
        )
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / "report.html").write_text(_report(metrics, grid), encoding="utf-8")
        commit_directory(tmp, target, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return metrics


def concept_metrics(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Each erased concept's numbers in the layout of a one-concept ``metrics.json`` (concept, anchor,
    before, after, anchor images, fidelity and the run's shared numbers): the metrics themselves for one
    concept, one per concept of ``per_concept`` for several."""
    if "per_concept" not in metrics:
        return [metrics]
    shared = {k: v for k, v in metrics.items() if k not in ("concepts", "anchors", "per_concept", "set", "bar")}
    return [{**shared, **block} for block in metrics["per_concept"].values()]


#: The numbers of a set's summary: (key, the metrics key (its strict form where there is one), relative).
SET_KEYS = (("ua", "ua", False), ("synonym_ua", "synonym_ua", False), ("ira", "ira", True), ("cra", "cra", True))


def set_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The set of concepts erased together, summed up by its worst concept on each number: UA and synonym
    UA (strict where measured) after erasure, and IRA and CRA as shares of the original's; ``bar_holds``
    when every concept meets the bar (:func:`bar_checks`)."""
    blocks = concept_metrics(metrics)
    worst: dict[str, Any] = {}
    for key, metric, relative in SET_KEYS:
        values = {}
        for block in blocks:
            name = f"strict_{metric}" if f"strict_{metric}" in block["after"] else metric
            value = block["after"][name]
            values[block["concept"]] = value / block["before"][name] if relative and block["before"][name] else value
        concept = min(values, key=lambda c: values[c])
        worst[f"{key}_of_original" if relative else key] = {"value": values[concept], "concept": concept}
    holds = all(check["holds"] for block in blocks for check in bar_checks(block))
    return {"concepts": [b["concept"] for b in blocks], "worst": worst, "bar_holds": holds}


def _concept_lines(metrics: dict[str, Any]) -> list[str]:
    """The before/after rows of one concept's numbers (the masked fraction has its own line)."""
    lines = [f"{'metric':<29}{'original':>10}{'erased':>10}   bar"]
    for label, original, erased, rule, holds in _table(metrics):
        if label == "masked":
            continue  # its own line below
        bar = f"   {rule}: {_holds(holds, 'NO')}" if rule else ""
        lines.append(f"{label:<29}{original:>10.1%}{erased:>10.1%}{bar}")
    reference = metrics["anchor_images"]
    lines.append(
        "the original model's own images of the anchor prompts "
        f"(what drawing exactly {metrics['anchor']} would score): "
        f"UA {reference['ua']:.1%}, synonym UA {reference['synonym_ua']:.1%}"
    )
    f = metrics["fidelity"]
    lines.append(f"fidelity of other prompts: PSNR {_db(f['psnr'])}, SSIM {f['ssim']:.4f}")
    return lines


def format_table(metrics: dict[str, Any]) -> str:
    """The before/after table the CLI prints (one per concept, and the set's worst numbers, for several)."""
    blocks = concept_metrics(metrics)
    lines = []
    for block in blocks:
        if len(blocks) > 1:
            lines.append(f"{block['concept']} -> {block['anchor']}:")
        lines.extend(_concept_lines(block))
    checks = bar_checks(blocks[0])
    if "masked_fraction" in metrics:
        lines.append(
            f"masked fraction {metrics['masked_fraction']:.2%} "
            f"(bar {checks[-1]['rule']}: {'yes' if checks[-1]['holds'] else 'NO'}), "
            f"{metrics['seconds']:.0f} s"
        )
    else:
        lines.append(f"{metrics['method']} changed: {metrics['cost']['changes']}, {metrics['seconds']:.0f} s")
    if len(blocks) == 1:
        lines.append(f"the bar: {_verdict(checks)}")
    else:
        lines.extend(f"the bar, {block['concept']}: {_verdict(bar_checks(block))}" for block in blocks)
        lines.append(f"the set: {_set_line(metrics['set'])}")
    return "\n".join(lines)


def _set_line(summary: dict[str, Any]) -> str:
    worst = summary["worst"]
    parts = [
        f"{label} {worst[key]['value']:.1%} ({worst[key]['concept']})"
        for key, label in (
            ("ua", "worst UA"),
            ("synonym_ua", "worst synonym UA"),
            ("ira_of_original", "worst IRA (of the original's)"),
            ("cra_of_original", "worst CRA (of the original's)"),
        )
    ]
    return ", ".join(parts) + (
        "; every concept meets the bar" if summary["bar_holds"] else "; not every concept meets the bar"
    )
