"""``erasekit <command>``: a thin layer over the library API.

Every error meant for the user is an :class:`~erasekit.errors.ErasekitError`: printed on one line,
exit code 2 (1 when training diverged), and no output folder left behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ErasekitError
from .reproducibility import pin_cpu_numerics

#: Torch threads of ``erasekit demo`` unless ``--threads`` says otherwise.
DEMO_THREADS = 2


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, help="denoising steps (default: the erasure's training steps, else 4)")
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the erasure's, else 512)")
    p.add_argument(
        "--guidance",
        type=float,
        help="guidance scale: classifier-free for SD/SDXL/SD3/PixArt/DiT, distilled for FLUX.1-dev "
        "(default: the erasure's, else none)",
    )
    p.add_argument("--max-sequence-length", type=int, help="text tokens (default: the erasure's, else 256)")
    p.add_argument(
        "--scheduler",
        choices=("pipeline", "ddim", "euler", "dpm", "pndm", "flow-euler"),
        help="sampler (default: the erasure's, else the pipeline's own)",
    )
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, float16, bfloat16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")


def build_parser() -> argparse.ArgumentParser:
    from .toyworld.protocol import PER_GROUP

    parser = argparse.ArgumentParser(prog="erasekit", description="Erase concepts from text-to-image models.")
    parser.add_argument("--version", action="version", version=f"erasekit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("erase", help="fit an erasure of a concept (default method: the sparse mask)")
    p.add_argument("--method", help="the erasure method (default: the config's method, mask); see `erasekit methods`")
    p.add_argument("--model", help="hub id or pipeline folder (default: the config's model.id)")
    p.add_argument(
        "--concept",
        action="append",
        help="the concept to erase, e.g. nudity or 'Hulk' (repeatable: several concepts in one erasure, "
        "for the methods that can; see `erasekit methods`)",
    )
    p.add_argument(
        "--anchor",
        action="append",
        help="what the concept becomes in target prompts, e.g. 'a man' (default: dropped); repeated, "
        "the anchors pair with the --concept flags in order; one is every concept's",
    )
    p.add_argument(
        "--concepts",
        dest="concepts_file",
        metavar="FILE",
        help="text file of concepts to erase together, one a line: 'concept' or 'concept => anchor'",
    )
    p.add_argument("--config", help="YAML recipe, e.g. configs/flux-schnell.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable)",
    )
    p.add_argument("--steps", type=int, help="denoising steps of the trained trajectory (sampling.steps)")
    p.add_argument("--resolution", type=int, help="image side in pixels (sampling.resolution)")
    p.add_argument("--iterations", type=int, help="optimiser steps (train.iterations)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run of the same --output")
    p.add_argument("--output", required=True, help="erasure folder to create")
    p.set_defaults(func=cmd_erase, pinned_numerics=True)

    p = sub.add_parser("generate", help="generate images, optionally with erasures applied")
    p.add_argument("--model", required=True, help="hub id or pipeline folder")
    p.add_argument(
        "--erasure",
        "--masks",
        dest="masks",
        action="append",
        default=[],
        metavar="DIR",
        help="erasure folder of `erasekit erase` (repeatable: masks combine); --masks is an alias",
    )
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    group.add_argument("--prompt-file", help="text file, one prompt per line")
    p.add_argument("--seed", type=int, action="append", help="noise seed (repeatable; default 0)")
    _add_generation_flags(p)
    p.add_argument("--output", required=True, help="folder to create with one PNG per prompt and seed")
    p.set_defaults(func=cmd_generate, pinned_numerics=True)

    p = sub.add_parser(
        "evaluate", help="generate with the original and erased models, detect the concept, score, report"
    )
    p.add_argument("--model", required=True, help="hub id or pipeline folder")
    p.add_argument(
        "--erasure",
        "--masks",
        dest="masks",
        action="append",
        default=[],
        metavar="DIR",
        help="an erased variant (repeatable: one variant each; DIR1,DIR2 combines erasures into one variant); "
        "--masks is an alias",
    )
    p.add_argument(
        "--prompts",
        required=True,
        metavar="NAME_OR_FILE",
        help="i2p, i2p-sexual, ring-a-bell-16/38/75, mma, p4d, coco-captions, concept:NAME, shapes:VALUE, "
        "hf:OWNER/NAME, or a .csv/.tsv/.txt/.jsonl file",
    )
    p.add_argument("--prompt-column", help="column of the prompts in a CSV/JSONL file or hub dataset (default: prompt)")
    p.add_argument(
        "--data-root",
        help="local folder holding prompts/ for the named file sets (default: $ERASEKIT_DATA, else the hub for I2P)",
    )
    p.add_argument("--limit", type=int, help="evaluate the first N prompts only")
    p.add_argument(
        "--seed",
        type=int,
        action="append",
        help="noise seed for every prompt (repeatable; default: the set's per-prompt seed, else 0)",
    )
    p.add_argument(
        "--detector",
        help="nudenet, shapes, clip or none "
        "(default: nudenet for nudity sets, shapes for shapes: sets, clip for concept: sets with --clip-model)",
    )
    p.add_argument(
        "--detector-model", help="the detector's model: NudeNet .onnx, ShapesCanvas detectors folder, or CLIP id/folder"
    )
    p.add_argument("--threshold", type=float, help="detection threshold (default: nudenet 0.6, clip 0.5)")
    p.add_argument(
        "--concept", help="the erased concept, for the clip and shapes detectors (default: from concept:/shapes: sets)"
    )
    p.add_argument(
        "--metrics",
        help="comma-separated: detection, clip-score, fid, kid, ssim, psnr, lpips, shapes, cost "
        "(default: those the inputs allow)",
    )
    p.add_argument(
        "--clip-model", help="CLIP model id or folder for clip-score and the clip detector (offline: a folder)"
    )
    p.add_argument("--reference", metavar="DIR", help="folder of real images for FID/KID")
    p.add_argument(
        "--fid-features",
        default="inception",
        help="FID/KID feature extractor: inception (torchmetrics, downloads weights) or a CLIP id/folder",
    )
    p.add_argument("--batch-size", type=int, default=1, help="images per generation batch (default 1)")
    _add_generation_flags(p)
    p.add_argument(
        "--output",
        required=True,
        help="folder to create with images/, results.jsonl, summary.json, grid.png, report.html",
    )
    p.set_defaults(func=cmd_evaluate, pinned_numerics=True)

    p = sub.add_parser("fold", help="bake erasures into the weights and save a stock diffusers pipeline")
    p.add_argument("--model", required=True, help="hub id or pipeline folder the erasures were made on")
    p.add_argument(
        "--erasure",
        "--masks",
        dest="masks",
        action="append",
        required=True,
        metavar="DIR",
        help="erasure folder (repeatable; --masks is an alias); inference-time erasures cannot be folded",
    )
    p.add_argument(
        "--mode",
        choices=("zero", "prune", "merge"),
        default="prune",
        help="masks: zero (same shapes) or prune (masked units removed); weight edits (uce, esd...): merge",
    )
    p.add_argument("--dtype", default="float32", help="dtype to load and save in: float32 (default), float16, bfloat16")
    p.add_argument("--output", required=True, help="pipeline folder to create")
    p.set_defaults(func=cmd_fold)

    p = sub.add_parser("methods", help="list the erasure methods: what each changes, trains?, needs CFG?, families")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("inspect", help="count a model's maskable units (weights are not loaded)")
    p.add_argument("model", help="hub id, pipeline folder, transformer folder or config.json")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("import-masks", help="convert masks of another implementation to an erasekit mask folder")
    p.add_argument("--format", required=True, choices=("minimalist-flux",), help="source format")
    p.add_argument("--attn", help="attn.pt of the reference implementation")
    p.add_argument("--ff", help="ff.pt")
    p.add_argument("--norm", help="norm.pt")
    p.add_argument(
        "--model", default="black-forest-labs/FLUX.1-schnell", help="model the masks belong to (config only)"
    )
    p.add_argument("--output", required=True, help="mask folder to create")
    p.set_defaults(func=cmd_import_masks)

    p = sub.add_parser("tiny-model", help="build a tiny random pipeline folder (for trying erasekit without weights)")
    p.add_argument("--family", choices=("flux", "sd", "sdxl", "sd3", "pixart", "dit"), default="flux")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="pipeline folder to create")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser(
        "demo", help="erase a concept from the embedded ShapesCanvas model and report before/after (CPU, minutes)"
    )
    p.add_argument(
        "--concept",
        action="append",
        help="an object, colour, style or background of ShapesCanvas (default: circle); repeatable: several "
        "values of one attribute erased by one erasure, each scored",
    )
    p.add_argument(
        "--output",
        default="outputs/demo",
        help="folder to create with metrics.json, grid.png, report.html, mask/ (default: outputs/demo)",
    )
    p.add_argument(
        "--anchor",
        action="append",
        help="what the concept becomes: another value of its attribute, or 'empty' for an object "
        "(default: an object's nearest neighbour in the model, square for circle; "
        "each other value in turn for a colour, style or background); repeated, one per --concept in order",
    )
    p.add_argument("--method", default="mask", help="the erasure method (default: mask); see `erasekit methods`")
    p.add_argument("--world", help="a ShapesCanvas world folder (default: the shipped one)")
    p.add_argument(
        "--images",
        type=int,
        default=PER_GROUP,
        help=f"evaluation images per group: concept, synonym, other values (default {PER_GROUP})",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the erasure recipe (repeatable)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    p.add_argument(
        "--seed",
        dest="seeds",
        type=int,
        action="append",
        metavar="N",
        help="training seed (default: the recipe's, 0); several, or several --threads, measure the spread: "
        "one run each under OUTPUT/runs/, and OUTPUT/spread.json and spread.md with mean, std and worst case",
    )
    p.add_argument(
        "--threads",
        dest="thread_counts",
        type=int,
        action="append",
        metavar="N",
        help=f"torch threads (default {DEMO_THREADS}; "
        "the CPU numerics are pinned so that a busy and an idle machine give the same mask)",
    )
    p.set_defaults(func=cmd_demo, pinned_numerics=True, resumes_output=_measures_spread)

    p = sub.add_parser("attack", help="attack an erasure: search prompts or embeddings that bring the concept back")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="hub id or pipeline folder")
    model.add_argument(
        "--world", choices=("shapes",), help="the embedded ShapesCanvas model, its sampling and its judge"
    )
    p.add_argument("--erasure", "--masks", dest="erasure", metavar="DIR", help="erasure folder (default: none)")
    p.add_argument("--concept", required=True, help="the concept the erasure removed")
    p.add_argument(
        "--attack",
        required=True,
        help=(
            "the attack (soft-prompt, p4d, unlearndiffatk, completion, ring-a-bell, ring-a-bell-embedding, "
            "textual-inversion)"
        ),
    )
    p.add_argument("--budget", type=int, help="the attack's budget in its own unit (default: the attack's)")
    p.add_argument("--seed", type=int, action="append", help="noise seed (repeatable; default 0-15)")
    p.add_argument("--detector", help="the judge: shapes, nudenet, clip (default: shapes with --world)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an attack setting, e.g. lr=0.1 or start_prompt='a shape' (repeatable)",
    )
    _add_generation_flags(p)
    p.add_argument("--output", required=True, help="folder to create (prompts or embeddings, images, summary)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    p.set_defaults(func=cmd_attack, pinned_numerics=True)

    p = sub.add_parser(
        "sweep",
        help="tune a method's ShapesCanvas recipe with Optuna; the Pareto front rescored on the evaluation draw",
    )
    p.add_argument("--method", default="mask", help="the method to tune (default: mask)")
    p.add_argument("--space", required=True, help="space.yaml: recipe keys and their ranges (docs/sweeps.md)")
    p.add_argument("--trials", type=int, required=True, help="completed trials the study should hold (all workers)")
    p.add_argument("--output", required=True, help="the sweep folder; an existing one is continued")
    p.add_argument("--config", help="base recipe (YAML) every trial starts from, on top of the demo's")
    p.add_argument("--storage", help="database URL shared by several workers (default: sqlite in --output)")
    p.add_argument("--sampler", choices=("tpe", "grid"), default="tpe", help="tpe (default) or grid")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0)")
    p.add_argument("--concept", default="circle", help="the ShapesCanvas concept to erase (default: circle)")
    p.add_argument("--anchor", help="what the concept becomes (as erasekit demo --anchor)")
    p.add_argument("--images", type=int, default=96, help="images per group of the tuning draw (default 96)")
    p.add_argument("--train-seed", type=int, default=0, help="every trial's training seed (default 0)")
    p.add_argument(
        "--no-rescore", action="store_true", help="do not rescore the front on the evaluation draw (extra workers)"
    )
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "bench",
        help="every method x concept x attack on ShapesCanvas: a resumable run, a leaderboard and a report",
    )
    p.add_argument(
        "--world", default="shapes", help="shapes (the embedded ShapesCanvas world, default) or a world folder"
    )
    p.add_argument("--methods", nargs="+", metavar="NAME", help="erasure methods (default: every registered one)")
    p.add_argument(
        "--concepts",
        nargs="+",
        metavar="CONCEPT",
        help="ShapesCanvas concepts (default: circle star red checkered); a+b is a set erased together",
    )
    p.add_argument("--attacks", nargs="+", metavar="NAME", help="attacks (default: every registered one)")
    p.add_argument(
        "--images", type=int, help=f"evaluation images per group: concept, synonym, other values (default {PER_GROUP})"
    )
    p.add_argument("--attack-budget", type=int, help="every attack's budget in its own unit (default: each attack's)")
    p.add_argument("--attack-seeds", type=int, help="attack the first N of the seeds 100-115 (default: all 16)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="uce and flowedit on circle, 16 images per group, the completion probe at budget 4 on 4 seeds "
        "(flags given as well replace its choices)",
    )
    p.add_argument("--threads", type=int, help="torch threads of each process (default: torch's choice)")
    p.add_argument("--output", required=True, help="the benchmark folder; an existing one is continued")
    p.set_defaults(func=cmd_bench, pinned_numerics=True, resumes_output=lambda args: True)

    p = sub.add_parser("toyworld", help="the ShapesCanvas world: retrain it, or measure its quality")
    world_sub = p.add_subparsers(dest="toyworld_command", required=True, metavar="ACTION")
    w = world_sub.add_parser("train", help="train the world from scratch (pipeline + detectors) into a new folder")
    w.add_argument("--output", required=True, help="world folder to create")
    w.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    w.set_defaults(func=cmd_toyworld_train)
    w = world_sub.add_parser(
        "quality", help="how well a world's model draws what it is asked (judged by its detectors)"
    )
    w.add_argument("--world", help="world folder (default: the shipped one)")
    w.add_argument("--count", type=int, default=200, help="prompts per check (default 200)")
    w.set_defaults(func=cmd_toyworld_quality)
    return parser


def _concept_flags(args: argparse.Namespace, anchor: str) -> dict[str, Any]:
    """The concept keys ``--concept``, ``--anchor`` and ``--concepts FILE`` set (none when none is given).

    ``anchor``: the recipe's ``concept.anchor``, which a concepts-file line without ``=>`` takes when
    there is no ``--anchor``.
    """
    from .data import read_concepts_file

    anchors = list(args.anchor or [])
    if args.concepts_file and args.concept:
        raise ErasekitError("give the concepts with --concept or with --concepts FILE, not both")
    if args.concepts_file:
        if len(anchors) > 1:
            raise ErasekitError(
                "with --concepts FILE give at most one --anchor (the anchor of lines that name none); "
                "write 'concept => anchor' lines for the others"
            )
        entries = read_concepts_file(args.concepts_file)
        names = [name for name, _ in entries]
        default = anchors[0] if anchors else anchor
        anchors = [a if a is not None else default for _, a in entries]
    elif args.concept:
        names = list(args.concept)
        if len(anchors) > 1 and len(anchors) != len(names):
            raise ErasekitError(
                f"{len(anchors)} --anchor flags for {len(names)} --concept flags; "
                "give one anchor per concept (in order), or one for all"
            )
    elif anchors:  # anchors alone: the recipe's concepts, in order
        return {"concept.anchor": anchors[0], "concept.more_anchors": anchors[1:]}
    else:
        return {}
    keys: dict[str, Any] = {"concept.concept": names[0], "concept.more_concepts": names[1:]}
    if anchors:
        keys["concept.anchor"] = anchors[0]
    keys["concept.more_anchors"] = anchors[1:] if len(anchors) > 1 else []
    return keys


def cmd_erase(args: argparse.Namespace) -> int:
    from .config import load_config, set_value
    from .methods import erase

    config = load_config(args.config, args.overrides)
    # the flags win over --set, and their text is taken as it is (not parsed as YAML)
    for key, value in _concept_flags(args, config.concept.anchor).items():
        set_value(config, key, value)
    for flag, key in (
        ("method", "method"),
        ("model", "model.id"),
        ("steps", "sampling.steps"),
        ("resolution", "sampling.resolution"),
        ("iterations", "train.iterations"),
    ):
        value = getattr(args, flag)
        if value is not None:
            set_value(config, key, value)
    erasure = erase(config, args.output, resume=args.resume)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under accelerate launch, one line for the whole run
        return 0
    print(f"{erasure.method} written to {args.output} ({erasure.changed_text()}, {erasure.cost.seconds:.1f} s)")
    return 0


def _generation_defaults(erasure_dirs: list[str]) -> dict[str, Any]:
    """The sampling settings of the first erasure (what generate and evaluate default to)."""
    from .methods import load_erasure

    if not erasure_dirs:
        return {}
    return load_erasure(erasure_dirs[0]).generation_defaults


def _sampling_flags(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    """Steps, resolution, guidance scale and text length: each flag given, else the erasure's value
    (``defaults``), else the command's own default."""
    given = {
        "steps": args.steps,
        "resolution": args.resolution,
        "guidance_scale": args.guidance,
        "max_sequence_length": args.max_sequence_length,
    }
    fallback = {"steps": 4, "resolution": 512, "guidance_scale": 0.0, "max_sequence_length": 256}
    return {key: value if value is not None else defaults.get(key, fallback[key]) for key, value in given.items()}


def cmd_generate(args: argparse.Namespace) -> int:
    from .arch.samplers import set_scheduler
    from .data import read_prompt_file
    from .errors import PromptError
    from .generate import generate_images, save_images
    from .methods import apply_erasures
    from .pipeline import load_pipeline

    prompts = read_prompt_file(args.prompt_file) if args.prompt_file else [p for p in args.prompt]
    if any(not p.strip() for p in prompts):
        raise PromptError("a --prompt is empty; give the text of the prompt")
    for flag in ("steps", "resolution", "max_sequence_length", "seed"):
        values = getattr(args, flag)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and (value < 1 if flag != "seed" else value < 0):
                raise ErasekitError(
                    f"--{flag.replace('_', '-')} must be "
                    f"{'non-negative' if flag == 'seed' else 'at least 1'}, got {value}"
                )
    defaults = _generation_defaults(args.masks)
    pipe = load_pipeline(args.model, args.dtype, args.device)
    set_scheduler(pipe, args.scheduler or defaults.get("scheduler", "pipeline"))
    if args.masks:
        apply_erasures(pipe, args.masks)
    images = generate_images(
        pipe,
        prompts,
        args.seed or [0],
        **_sampling_flags(args, defaults),
    )
    save_images(images, args.output)
    print(f"{len(images)} images written to {args.output}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from .evaluation import EvaluationConfig, run_evaluation

    mask_groups = [[m.strip() for m in value.split(",") if m.strip()] for value in args.masks]
    # sampling defaults come from the first erasure, as in `erasekit generate`
    defaults = _generation_defaults([g[0] for g in mask_groups if g][:1])
    config = EvaluationConfig(
        model=args.model,
        prompts=args.prompts,
        output=args.output,
        masks=mask_groups,
        data_root=args.data_root,
        prompt_column=args.prompt_column,
        limit=args.limit,
        detector=args.detector,
        detector_model=args.detector_model,
        threshold=args.threshold,
        concept=args.concept,
        metrics=args.metrics,
        clip_model=args.clip_model,
        reference=args.reference,
        fid_features=args.fid_features,
        seeds=args.seed,
        steps=args.steps if args.steps is not None else defaults.get("steps", 4),
        resolution=args.resolution if args.resolution is not None else defaults.get("resolution", 512),
        guidance=args.guidance,
        default_guidance=defaults.get("guidance_scale", 0.0),
        max_sequence_length=args.max_sequence_length
        if args.max_sequence_length is not None
        else defaults.get("max_sequence_length", 256),
        scheduler=args.scheduler or defaults.get("scheduler", "pipeline"),
        dtype=args.dtype,
        device=args.device,
        batch_size=args.batch_size,
    )
    result = run_evaluation(config)
    if result is None or not PartialState().is_main_process:
        return 0
    rows = ", ".join(
        f"{name}: " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float))
        for name, row in result.summary["metrics"].items()
    )
    print(f"evaluation written to {result.output} ({rows}); open {result.output / 'report.html'}")
    return 0


def cmd_fold(args: argparse.Namespace) -> int:
    from .arch import denoiser_of
    from .methods import fold_erasures, load_erasure, save_folded_pipeline
    from .pipeline import load_pipeline

    erasures = [load_erasure(m) for m in args.masks]
    for erasure in erasures:  # an inference-time erasure is refused before the model is loaded
        erasure.check_foldable(args.mode)
    pipe = load_pipeline(args.model, args.dtype, "cpu")
    before = sum(p.numel() for p in denoiser_of(pipe)[1].parameters())
    fold_erasures(pipe, args.masks, args.mode)
    after = sum(p.numel() for p in denoiser_of(pipe)[1].parameters())
    provenance = {
        "model": args.model,
        "masks": [str(Path(m).resolve()) for m in args.masks],
        "methods": [e.method for e in erasures],
        "costs": [e.cost.to_dict() for e in erasures],
    }
    save_folded_pipeline(pipe, args.output, args.mode, provenance)
    load_hint = ", trust_remote_code=True" if args.mode == "prune" else ""
    print(
        f"{args.mode}-folded pipeline written to {args.output} (denoiser parameters {before:,} -> {after:,}); "
        f"load it with DiffusionPipeline.from_pretrained({args.output!r}{load_hint})"
    )
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import available_methods, get_method

    rows = [get_method(name).describe() for name in available_methods()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [("method", "trains", "CFG", "changes", "families")] + [
        (
            row["name"],
            "yes" if row["trains"] else "no",
            "yes" if row["needs_cfg"] else "no",
            row["changes"],
            ", ".join(row["families"]),
        )
        for row in rows
    ]
    widths = [max(len(line[column]) for line in table) + 2 for column in range(4)]  # the last column runs on
    for line in table:
        print("".join(cell.ljust(width) for cell, width in zip(line, widths)) + line[4])
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import format_inspection, inspect_model

    info = inspect_model(args.model)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0


def cmd_import_masks(args: argparse.Namespace) -> int:
    from .methods.mask.reference import import_minimalist_flux_artifact

    if not (args.attn or args.ff or args.norm):
        raise ErasekitError("give at least one of --attn, --ff, --norm")
    for flag in ("attn", "ff", "norm"):
        value = getattr(args, flag)
        if value and not Path(value).is_file():
            raise ErasekitError(f"--{flag} file {value!r} does not exist")
    path = import_minimalist_flux_artifact(args.attn, args.ff, args.norm, args.model, args.output)
    print(f"imported masks written to {path}")
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from .tiny import SAVERS

    path = SAVERS[args.family](args.output, seed=args.seed)
    print(f"tiny {args.family} pipeline written to {path}")
    return 0


def _quiet_libraries() -> None:
    """Keep the libraries' informational warnings (deprecations, optional backends) off the terminal."""
    import warnings

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    # their loading/saving progress bars would surround an error message with bar lines on stderr
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _measures_spread(args: argparse.Namespace) -> bool:
    """Several training seeds or thread counts: ``demo`` measures the spread, resuming in its --output."""
    return len(args.seeds or []) > 1 or len(args.thread_counts or []) > 1


def cmd_demo(args: argparse.Namespace) -> int:
    if args.images < 1:
        raise ErasekitError(f"--images must be at least 1, got {args.images}")
    threads = args.thread_counts or [DEMO_THREADS]
    if any(t < 1 for t in threads):
        raise ErasekitError(f"--threads must be at least 1, got {threads}")
    pin_cpu_numerics(threads[0])  # main() pinned the rest before torch was imported
    from .toyworld.demo import as_concepts, format_table, run_demo

    concepts, anchors = as_concepts(args.concept or ["circle"], args.anchor or [None])
    if _measures_spread(args):
        from .toyworld.spread import run_spread

        if len(concepts) > 1:
            raise ErasekitError("several --seed or --threads measure the spread of one concept's erasure; give one")
        run_spread(
            concepts[0],
            args.output,
            seeds=args.seeds or [0],
            threads=threads,
            per_group=args.images,
            anchor=anchors[0],
            overrides=args.overrides,
            world_path=args.world,
            method=args.method,
        )
        print(Path(args.output, "spread.md").read_text(encoding="utf-8"))
        return 0
    overrides = [*args.overrides, *(f"train.seed={s}" for s in args.seeds or [])]
    metrics = run_demo(
        concepts if len(concepts) > 1 else concepts[0],
        args.output,
        world_path=args.world,
        per_group=args.images,
        anchor=anchors if len(anchors) > 1 else anchors[0],
        overrides=overrides,
        overwrite=args.overwrite,
        method=args.method,
    )
    erased = " and ".join(repr(c) for c in metrics.get("concepts", [metrics.get("concept")]))
    print(f"erasing {erased} from the ShapesCanvas model")
    print(format_table(metrics))
    print(f"report: {Path(args.output) / 'report.html'}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    from .attacks import Sampling, get_attack, run_attack
    from .errors import ConfigError
    from .methods import load_erasure
    from .pipeline import load_pipeline

    attack = get_attack(args.attack)  # an unknown attack or a bad erasure fails before the model loads
    erasure = load_erasure(args.erasure) if args.erasure else None
    settings: dict[str, Any] = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not KEY=VALUE")
        settings[key.strip()] = yaml.safe_load(value)
    defaults = dict(erasure.generation_defaults) if erasure is not None else {}
    if args.world:
        from .toyworld.world import World

        world = World.load()
        model, defaults = str(world.pipeline_path), {**defaults, **world.sampling}
        if "pairs" in {f.name for f in dataclasses.fields(attack.config_class)} and "pairs" not in settings:
            from .toyworld.protocol import concept_pairs

            # Ring-a-Bell's concept vector: the world's templates with and without the concept
            settings["pairs"] = concept_pairs(args.concept)
    else:
        model = args.model
    detector = args.detector or ("shapes" if args.world else None)
    if detector is None:
        raise ConfigError("--detector is needed with --model: shapes, nudenet or clip")
    sampling = Sampling(
        **_sampling_flags(args, defaults), scheduler=args.scheduler or defaults.get("scheduler", "pipeline")
    )
    pipe = load_pipeline(model, args.dtype, args.device)
    result = run_attack(
        pipe,
        args.attack,
        erasure=erasure,
        concept=args.concept,
        judge=detector,
        seeds=args.seed or list(range(16)),
        sampling=sampling,
        budget=args.budget,
        output=args.output,
        config=settings,
        overwrite=args.overwrite,
    )
    rate = result.attack_success_rate
    print(
        f"{args.attack}: concept shown on {result.pre_rate:.1%} of seeds before the attack, {result.post_rate:.1%} "
        f"after; attack success {'n/a (all shown before)' if rate is None else f'{rate:.1%}'} "
        f"({len(result.seeds)} seeds, budget {result.budget}, {result.seconds:.0f} s); written to {args.output}"
    )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep.command import main as sweep

    sweep(
        method=args.method,
        space=args.space,
        trials=args.trials,
        output=args.output,
        config=args.config,
        storage=args.storage,
        sampler=args.sampler,
        seed=args.seed,
        concept=args.concept,
        anchor=args.anchor,
        images=args.images,
        train_seed=args.train_seed,
        rescore=not args.no_rescore,
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import make_settings, run_bench

    settings = make_settings(
        methods=args.methods,
        concepts=args.concepts,
        attacks=args.attacks,
        images=args.images,
        attack_budget=args.attack_budget,
        attack_seeds=args.attack_seeds,
        quick=args.quick,
    )  # every name and number is checked before the world loads
    if args.threads is not None:
        if args.threads < 1:
            raise ErasekitError(f"--threads must be at least 1, got {args.threads}")
        pin_cpu_numerics(args.threads)
    run_bench(settings, args.output, world_path=None if args.world == "shapes" else args.world)
    return 0


def cmd_toyworld_train(args: argparse.Namespace) -> int:
    from .toyworld.build import build_world

    path = build_world(args.output, threads=args.threads)
    print(f"world written to {path}")
    return 0


def cmd_toyworld_quality(args: argparse.Namespace) -> int:
    from .toyworld.world import World, measure_quality

    if args.count < 8:
        raise ErasekitError(f"--count must be at least 8, got {args.count}")
    print(json.dumps(measure_quality(World.load(args.world), count=args.count, progress=True), indent=2))
    return 0


class _Terminated(BaseException):
    """SIGTERM, raised where the process was, so that every cleanup on the way out runs."""


def _terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def _check_arguments(args: argparse.Namespace) -> None:
    """Checks every command shares, before any of them loads anything: text arguments are valid
    Unicode, and the --output folder can be created (:func:`erasekit.outputs.check_output`)."""
    from .outputs import check_output

    for name, value in vars(args).items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:  # bytes the terminal's encoding could not decode
                    raise ErasekitError(f"--{name.replace('_', '-')} {text!r} is not valid UTF-8 text") from None
    if getattr(args, "output", None) is not None:
        resumes = getattr(args, "resumes_output", None)  # a command that continues in an existing folder
        check_output(args.output, overwrite=getattr(args, "overwrite", False) or bool(resumes and resumes(args)))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``erasekit`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "pinned_numerics", False):
        # The commands that run a model pin the CPU numerics (erasekit.reproducibility; no effect on GPU
        # kernels): the same input gives the same bits on any x86 machine, busy or idle. Before anything
        # imports torch (the libraries below do): OpenMP reads its settings when it loads.
        pin_cpu_numerics()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        _quiet_libraries()
    func: Callable[[argparse.Namespace], int] = args.func
    # `kill`/a job scheduler ends a run with SIGTERM: unwind as on Ctrl-C, so that temporary folders are removed
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        _check_arguments(args)
        return func(args)
    except ErasekitError as exc:
        print(f"erasekit {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"erasekit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"erasekit {args.command}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"erasekit {args.command}: terminated", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
