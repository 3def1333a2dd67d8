"""The cells of a benchmark: what each computes, the key of its inputs, and its cached result folder.

Two kinds of cell:

* an **erasure** cell fits one method on one concept set with the method's ShapesCanvas recipe (the
  demo's: :func:`erasekit.toyworld.demo.erasure_config`), then scores it with the protocol on the
  evaluation draw (the numbers ``erasekit demo`` reports: strict UA, UA, synonym UA, IRA, CRA,
  fidelity) and records its cost; its artefact stays in the cell folder (``erasure/``);
* an **attack** cell runs one registered attack against an erasure cell's artefact, for one concept
  of its set (the attack's own folder, ``attack/``, as ``erasekit attack`` writes it).

A cell's key is the sha256 of every input that decides its result (:func:`cell_key`): the world's
pipeline and judges, the resolved recipe, the protocol's draw, the attack's settings, the numerics
that draw the bits, the source of the code that computes it, and for an attack cell the key of its
erasure cell. A finished cell is the folder ``cells/<name>-<key prefix>/`` with ``cell.json``; it is
written under a temporary name and renamed when complete (:func:`erasekit.outputs.atomic_directory`),
so an interrupted run loses at most the cell it was computing.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import EraseConfig, config_to_dict
from ..errors import ConfigError, ErasekitError
from ..outputs import atomic_directory, commit_directory, folder_sha256, json_sha256

#: Bumped when what a cell holds, or how it is computed, changes in a way the code hash cannot see.
BENCH_FORMAT = 1
#: The folder of the cells inside a benchmark's output, and each cell's record.
CELLS, CELL_FILE = "cells", "cell.json"
#: Noise seeds of the attacks (the attack documentation's measured seeds: no recipe or attack was tuned on them).
ATTACK_SEEDS: tuple[int, ...] = tuple(range(100, 116))
#: The default ShapesCanvas concept sets: four concepts alone, and circle with star erased by one fit (the
#: set the demo's several-concepts measurement used; module docstring of :mod:`erasekit.bench`).
DEFAULT_CONCEPTS: tuple[tuple[str, ...], ...] = (("circle",), ("star",), ("red",), ("checkered",), ("circle", "star"))

_SOURCE_ROOT = Path(__file__).resolve().parent.parent
#: The code an erasure cell runs besides its method's own package: the shared method and training code,
#: the protocol and its judges, and this module.
ERASURE_CODE = (
    "erasekit.methods.base",
    "erasekit.methods.finetune",
    "erasekit.methods.inference",
    "erasekit.methods.weights",
    "erasekit.training",
    "erasekit.toyworld.protocol",
    "erasekit.toyworld.demo",
    "erasekit.toyworld.geometry",
    "erasekit.toyworld.detectors",
    "erasekit.toyworld.world",
    "erasekit.bench.cells",
)
ATTACK_CODE = ("erasekit.attacks", "erasekit.bench.cells")


@dataclass(frozen=True)
class BenchSettings:
    """What a benchmark runs: every method on every concept set, and every attack on every erasure.

    ``images``: evaluation images per group (target, synonym, in-domain) of the protocol's draw.
    ``attack_budget``: each attack's budget (None: each attack's default). ``attack_seeds``: the
    attacks' noise seeds.
    """

    methods: tuple[str, ...]
    concept_sets: tuple[tuple[str, ...], ...]
    attacks: tuple[str, ...]
    images: int
    attack_budget: int | None = None
    attack_seeds: tuple[int, ...] = ATTACK_SEEDS

    def record(self) -> dict[str, Any]:
        return {
            "methods": list(self.methods),
            "concept_sets": [list(s) for s in self.concept_sets],
            "attacks": list(self.attacks),
            "images_per_group": self.images,
            "attack_budget": self.attack_budget,
            "attack_seeds": list(self.attack_seeds),
        }


@dataclass
class Cell:
    """One unit of work and its identity.

    ``inputs``: everything its key covers (:func:`cell_key`). ``config``: an erasure cell's resolved
    recipe. ``erasure``: an attack cell's erasure cell. ``concept``: the concept an attack cell attacks.
    """

    kind: str
    method: str
    concepts: tuple[str, ...]
    inputs: dict[str, Any]
    attack: str | None = None
    concept: str | None = None
    config: EraseConfig | None = None
    erasure: Cell | None = None
    budget: int | None = None
    key: str = field(init=False)

    def __post_init__(self) -> None:
        self.key = cell_key(self.inputs)

    @property
    def label(self) -> str:
        """``erasure-uce-circle``, ``attack-completion-uce-circle``: what a person reads in the folder name."""
        parts = [self.kind, *([self.attack] if self.attack else []), self.method, "+".join(self.concepts)]
        if self.concept is not None and len(self.concepts) > 1:
            parts.append(self.concept)
        return "-".join(parts)

    @property
    def name(self) -> str:
        """The cell's folder name: its label and the first 16 hex digits of its key."""
        return f"{self.label}-{self.key[:16]}"


def cell_key(inputs: dict[str, Any]) -> str:
    """The sha256 of a cell's inputs (JSON with sorted keys): any changed input, another key."""
    return json_sha256(inputs, default=str)


def source_sha256(modules: Sequence[str]) -> str:
    """sha256 of the source files of ``modules`` (a package: every ``.py`` file under its folder)."""
    files: set[Path] = set()
    for name in modules:
        module = sys.modules.get(name) or importlib.import_module(name)
        path = Path(module.__file__ or "").resolve()
        if path.name == "__init__.py":
            files.update(path.parent.rglob("*.py"))
        else:
            files.add(path)
    return folder_sha256(_SOURCE_ROOT, select=lambda p: p.resolve() in files)


def method_code(method: str) -> str:
    """sha256 of a method's own package and of the code every erasure cell runs (:data:`ERASURE_CODE`)."""
    from ..methods import get_method

    package = type(get_method(method)).__module__.rpartition(".")[0]
    return source_sha256([package, *ERASURE_CODE])


def world_record(world: Any) -> dict[str, Any]:
    """What identifies a world to a cell: its pipeline's files, its judges' files, its sampling settings."""
    from ..toyworld.image_cache import world_hash
    from ..toyworld.world import MORPH_DETECTORS

    morph = Path(world.path) / MORPH_DETECTORS
    return {
        "pipeline_sha256": world_hash(world),
        "detectors_sha256": folder_sha256(Path(world.path) / "detectors"),
        "morph_detectors_sha256": folder_sha256(morph) if morph.is_dir() else None,
        "sampling": dict(world.sampling),
    }


def numerics_inputs() -> dict[str, Any]:
    """What decides the bits of a CPU run besides the code (the thread count does not, once pinned:
    :mod:`erasekit.reproducibility`)."""
    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def check_concept_set(concepts: Sequence[str]) -> None:
    """Refuse, in one line, a concept set the ShapesCanvas protocol cannot erase together.

    Raises:
        ErasekitError: a concept given twice, or concepts of different attributes (the demo's rule:
            :func:`erasekit.toyworld.protocol.check_concepts`).
    """
    from ..toyworld import protocol

    try:
        protocol.check_concepts(concepts, [None] * len(concepts))
    except ErasekitError as exc:
        raise ConfigError(f"bench: the concept set {'+'.join(concepts)}: {exc}") from None


def erasure_recipe(world: Any, method: str, concepts: tuple[str, ...]) -> EraseConfig:
    """The method's ShapesCanvas recipe for a concept set: the demo's recipe filled in by the world, with
    every concept of the set and its anchor (``erasekit demo --concept a --concept b``). A method that
    cannot erase several concepts in one fit refuses the set when its cell runs (the cell's ``error``).

    Raises:
        ConfigError: a set the protocol refuses (:func:`check_concept_set`).
    """
    from ..toyworld.demo import erasure_config

    check_concept_set(concepts)
    config = erasure_config(world, list(concepts))
    config.method = method
    return config


def recipe_inputs(config: EraseConfig) -> dict[str, Any]:
    """The resolved recipe as a cell's key sees it: without the world's folder path (the world's hash
    stands for it) and without the other methods' sections, which this method never reads (so that
    tuning one method's recipe leaves the other methods' cells finished)."""
    from ..methods import available_methods, get_method

    def section(name: str) -> str:
        method = get_method(name)
        return method.section or method.name.replace("-", "_")

    recipe = config_to_dict(config)
    recipe["model"].pop("id")
    for name in available_methods():
        if name != config.method:
            recipe.pop(section(name), None)
    return recipe


def protocol_inputs(concepts: Sequence[str], images: int) -> dict[str, Any]:
    """The evaluation draw of every concept of a set: its size, seeds and the sha256 of its samples."""
    from ..toyworld import protocol

    samples = {
        c: [(s.prompt, s.seed, s.group) for s in protocol.evaluation_samples(c, per_group=images)] for c in concepts
    }
    return {
        "images_per_group": images,
        "seed": protocol.EVALUATION_SEED,
        "image_seed_base": protocol.EVALUATION_SEED_BASE,
        "samples_sha256": json_sha256(samples),
    }


def world_sampling(world: Any) -> Any:
    """The world's sampling settings as the attacks take them (:class:`erasekit.attacks.Sampling`)."""
    from ..attacks import Sampling

    return Sampling(**{k: world.sampling[k] for k in asdict(Sampling()) if k in world.sampling})


def plan(world: Any, settings: BenchSettings) -> list[Cell]:
    """Every cell of ``settings`` on ``world``: the erasure cells (methods x concept sets), then the
    attack cells (each erasure x each concept of its set x each attack), in that order.

    The order matters to several processes: each takes every n-th cell, so all of them fit their
    erasures before any attack cell waits for one.
    """
    from ..attacks import get_attack

    world_inputs, numerics = world_record(world), numerics_inputs()
    sampling = world_sampling(world)
    erasures: list[Cell] = []
    for method in settings.methods:
        code = method_code(method)
        for concepts in settings.concept_sets:
            config = erasure_recipe(world, method, concepts)
            inputs = {
                "kind": "erasure",
                "format": BENCH_FORMAT,
                "erasekit": __version__,
                "code": code,
                "world": world_inputs,
                "numerics": numerics,
                "method": method,
                "concepts": list(concepts),
                "recipe": recipe_inputs(config),
                "protocol": protocol_inputs(concepts, settings.images),
            }
            erasures.append(Cell("erasure", method, concepts, inputs, config=config))
    attack_code = source_sha256(ATTACK_CODE)
    attacks: list[Cell] = []
    for erasure in erasures:
        for concept in erasure.concepts:
            for name in settings.attacks:
                attack = get_attack(name)
                budget = settings.attack_budget or attack.default_budget_for(sampling)
                attack.check_budget(budget, sampling)
                inputs = {
                    "kind": "attack",
                    "format": BENCH_FORMAT,
                    "erasekit": __version__,
                    "code": attack_code,
                    "erasure": erasure.key,
                    "attack": name,
                    "concept": concept,
                    "budget": budget,
                    "seeds": list(settings.attack_seeds),
                    "settings": asdict(attack.make_config()),
                    "sampling": asdict(sampling),
                    "judge": "shapes",
                }
                attacks.append(
                    Cell(
                        "attack",
                        erasure.method,
                        erasure.concepts,
                        inputs,
                        attack=name,
                        concept=concept,
                        erasure=erasure,
                        budget=budget,
                    )
                )
    return erasures + attacks


# --------------------------------------------------------------------------- computing a cell
def peak_memory_window() -> Callable[[], tuple[int, str]]:
    """Start measuring this process's peak memory; the returned function reads it.

    On Linux the kernel's high-water mark of the resident set is reset first (``/proc/self/clear_refs``),
    so the peak is the block's own; elsewhere it is the process's peak so far, and says so.
    """
    from ..methods.base import peak_memory_bytes

    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return lambda: (peak_memory_bytes(), "process peak resident memory so far")

    def read() -> tuple[int, str]:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "peak resident memory of the fit (the world loaded included)"
        return peak_memory_bytes(), "process peak resident memory so far"

    return read


def compute_erasure(world: Any, cell: Cell, folder: Path, images: int) -> dict[str, Any]:
    """Fit ``cell``'s erasure into ``folder/erasure`` and score it on the protocol's evaluation draw."""
    import numpy as np
    import torch

    from ..methods import apply_erasures, erase
    from ..toyworld import protocol
    from ..toyworld.demo import fidelity, judge
    from ..toyworld.image_cache import original_images

    assert cell.config is not None
    peak = peak_memory_window()
    erasure = erase(cell.config, folder / "erasure")
    peak_bytes, peak_source = peak()
    cost = {**erasure.cost.to_dict(), "peak_memory_bytes": peak_bytes, "peak_memory": peak_source}
    scores: dict[str, Any] = {}
    sampling_seconds = 0.0
    for concept in cell.concepts:
        samples = protocol.evaluation_samples(concept, per_group=images)
        prompts, seeds = [s.prompt for s in samples], [s.seed for s in samples]
        keep = np.array([s.group == "in_domain" for s in samples])
        before, latents_before = original_images(world, prompts, seeds, latent_rows=np.flatnonzero(keep).tolist())
        handle = apply_erasures(world.pipe, [folder / "erasure"])
        started = time.perf_counter()
        try:
            after, latents_after = world.generate(prompts, seeds, return_latents=True)
        finally:
            handle.remove()
        # what the erased model costs to sample with: inference-time methods pay here, not in the fit
        sampling_seconds += time.perf_counter() - started
        scores[concept] = {
            "before": judge(world, concept, samples, before),
            "after": judge(world, concept, samples, after),
            "fidelity": fidelity(before[keep], after[keep], latents_before, latents_after[torch.from_numpy(keep)]),
        }
    cost["sampling_seconds"] = round(sampling_seconds, 3)
    report = {k: v for k, v in erasure.report().items() if isinstance(v, (int, float, str, bool))}
    return {"anchor": cell.config.concept.anchor, "scores": scores, "report": report, "cost": cost}


def compute_attack(world: Any, cell: Cell, folder: Path, erasure_folder: Path, seeds: list[int]) -> dict[str, Any]:
    """Run ``cell``'s attack against the erasure in ``erasure_folder``; its folder goes to ``folder/attack``."""
    from ..attacks import detector_judge, run_attack
    from ..methods import load_erasure

    assert cell.attack is not None and cell.concept is not None
    result = run_attack(
        world.pipe,
        cell.attack,
        erasure=load_erasure(erasure_folder),
        concept=cell.concept,
        judge=detector_judge("shapes", cell.concept, model=str(Path(world.path) / "detectors")),
        seeds=seeds,
        sampling=world_sampling(world),
        budget=cell.budget,
        output=folder / "attack",
    )
    summary = result.summary()
    keys = ("budget", "budget_used", "pre_attack_rate", "post_attack_rate", "new_successes", "attack_success_rate")
    return {
        **{k: summary[k] for k in keys},
        "seconds": round(result.seconds, 3),
        "denoiser_calls": result.denoiser_calls,
    }


def compute_cell(world: Any, settings: BenchSettings, output: Path, cell: Cell, folder: Path) -> dict[str, Any]:
    """Compute ``cell`` of ``settings`` into ``folder`` (an attack cell: against its finished erasure cell in
    ``output``)."""
    world.ensure_pipeline()
    if cell.kind == "erasure":
        return compute_erasure(world, cell, folder, settings.images)
    assert cell.erasure is not None
    erasure = read_cell(output, cell.erasure)
    if erasure is None or erasure["error"]:
        raise ErasekitError(f"its erasure cell {cell.erasure.name} failed, so there is nothing to attack")
    return compute_attack(
        world, cell, folder, cell_folder(output, cell.erasure) / "erasure", list(settings.attack_seeds)
    )


# --------------------------------------------------------------------------- the cache
def cell_folder(output: Path, cell: Cell) -> Path:
    return output / CELLS / cell.name


def read_cell(output: Path, cell: Cell) -> dict[str, Any] | None:
    """A finished cell's record, or None (not there, or another cell's under a colliding name)."""
    try:
        record = json.loads((cell_folder(output, cell) / CELL_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("key") == cell.key else None


def write_cell(
    output: Path, cell: Cell, compute: Callable[[Path], dict[str, Any]], context: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Compute ``cell`` into a temporary folder beside its own and rename it into place; returns its record.

    ``compute`` gets the temporary folder and returns the cell's result. A one-line erasekit error
    (a method that refuses the concept, an attack that refuses the erasure) is the cell's result
    too (``error``): it would fail the same way on every rerun. Anything else propagates and leaves
    nothing behind. A cell that another process finished meanwhile is kept and its record returned.
    """
    target = cell_folder(output, cell)
    tmp = atomic_directory(target)
    try:
        started = time.perf_counter()
        try:
            result, error = compute(tmp), None
        except ErasekitError as exc:
            result, error = {}, str(exc)
        record = {
            "key": cell.key,
            "name": cell.name,
            "kind": cell.kind,
            "method": cell.method,
            "concepts": list(cell.concepts),
            "attack": cell.attack,
            "concept": cell.concept,
            "inputs": cell.inputs,
            "result": result,
            "error": error,
            "seconds": round(time.perf_counter() - started, 3),
            **(context or {}),
        }
        (tmp / CELL_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        commit_directory(tmp, target)
    except FileExistsError:  # another process finished the same cell first: its record stands
        done = read_cell(output, cell)
        if done is None:
            raise
        return done
    return record


def remove_partials(output: Path) -> list[Path]:
    """Remove the temporary folders of cells whose process was killed; returns them."""
    folder = output / CELLS
    stale = sorted(folder.glob(".*.partial")) if folder.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale
