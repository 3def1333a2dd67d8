"""The attack framework: a registry of attacks, the erasure and judge protocols, one result type, and
writing a result folder.

An attack tests an erasure: it gets a pipeline, an erasure (anything whose ``apply(pipe)`` installs it
and returns a handle with ``remove()``; ``None`` attacks the original model), the concept, a judge
(images -> per-image "the concept is there"), a budget and noise seeds, and returns an
:class:`AttackResult`: what it found (prompts or embeddings), the images, and per seed whether the
judge saw the concept before the attack (the erased model on the concept prompt, no attack) and
after it. The two rates are reported separately; a seed that already showed the concept before the
attack is never counted as an attack success (:attr:`AttackResult.attack_success_rate`).

No attack looks at the judge while it searches unless its config asks for it
(``stop_on_success``), and then the result records that it did.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..config import SamplingConfig
from ..errors import ConfigError, PromptError
from ..methods.base import FOLD_RECORD, ErasureHandle
from ..outputs import atomic_directory, check_output, commit_directory

AttackKind = Literal["continuous", "discrete", "probe"]

#: ``summary.json`` format name and version (the version changes only when a reader would misread it).
SUMMARY_FORMAT = "erasekit-attack"
SUMMARY_FORMAT_VERSION = 1


# --------------------------------------------------------------------------- protocols
@runtime_checkable
class Erasure(Protocol):
    """Anything that edits a pipeline reversibly: a mask, a method's edit, a guidance object."""

    def apply(self, pipe: Any) -> ErasureHandle: ...


@runtime_checkable
class Judge(Protocol):
    """Images -> one bool per image: the concept is present. ``name`` and ``threshold`` are recorded."""

    name: str
    threshold: float | None

    def __call__(self, images: Sequence[Image.Image]) -> list[bool]: ...


class DetectorJudge:
    """A judge backed by an evaluation detector (``erasekit.evaluation.detectors``): the detectors read
    image files, so the images are written to a temporary folder first."""

    def __init__(self, detector: Any) -> None:
        self.detector = detector
        self.name: str = detector.name
        self.threshold: float | None = detector.threshold

    def __call__(self, images: Sequence[Image.Image]) -> list[bool]:
        with tempfile.TemporaryDirectory(prefix="erasekit-judge-") as folder:
            paths = []
            for i, image in enumerate(images):
                path = Path(folder) / f"{i:05d}.png"
                image.save(path)
                paths.append(path)
            return [bool(record["detected"]) for record in self.detector.detect(paths)]

    def provenance(self) -> dict[str, Any]:
        """The detector's own provenance (package version, model hash, threshold)."""
        return dict(self.detector.provenance())


def detector_judge(name: str, concept: str, model: str | None = None, threshold: float | None = None) -> DetectorJudge:
    """The judge of a registered detector (``shapes``, ``nudenet``, ``clip``) for ``concept``.

    Raises:
        ErasekitError: unknown detector, or one that cannot judge ``concept``.
    """
    from ..evaluation.detectors import get_detector

    return DetectorJudge(get_detector(name, concept=concept, model=model, threshold=threshold))


def judge_record(judge: Callable[..., Any]) -> dict[str, Any]:
    """Name, threshold and (where the judge has one) provenance of a judge, for ``summary.json``."""
    record: dict[str, Any] = {
        "name": getattr(judge, "name", type(judge).__name__),
        "threshold": getattr(judge, "threshold", None),
    }
    provenance = getattr(judge, "provenance", None)
    if callable(provenance):
        record["provenance"] = provenance()
    return record


def judge_images(judge: Callable[[Sequence[Image.Image]], Sequence[bool]], images: list[Image.Image]) -> list[bool]:
    """Call ``judge`` and check it answered once per image."""
    verdicts = [bool(v) for v in judge(images)]
    if len(verdicts) != len(images):
        raise ConfigError(
            f"the judge returned {len(verdicts)} verdicts for {len(images)} images; it must return one each"
        )
    return verdicts


# --------------------------------------------------------------------------- settings
#: How an attack draws images: the project's one sampling type (steps, resolution, guidance scale,
#: text length, sampler), as ``erasekit generate`` draws them. :func:`run_attack` samples with
#: ``generation_steps`` where set (:meth:`SamplingConfig.for_generation`) and installs ``scheduler`` for the run.
Sampling = SamplingConfig


@dataclass
class AttackConfig:
    """Settings every attack has; each attack subclasses it with its own.

    ``batch_size``: seeds attacked together (rows are independent; a smaller batch saves memory).
    ``stop_on_success``: let the attack look at the judge while it searches and stop a seed once the
    judge sees the concept (off by default: stopping on the judge selects on the judge; when on, the
    summary records it).
    """

    batch_size: int = 16
    stop_on_success: bool = False


# --------------------------------------------------------------------------- results
@dataclass
class SeedResult:
    """One seed: the judge's verdict before the attack (the erased model on the concept prompt, or the
    attack's target prompt where it has one, from the same noise) and after."""

    seed: int
    pre_success: bool
    post_success: bool
    budget_used: int
    loss: float | None = None
    start_success: bool | None = None
    """The judge on the attack's starting point (soft-prompt: the initial prompt), where it has one."""
    stopped_early: bool = False

    @property
    def attack_success(self) -> bool:
        """The attack made the concept appear where the erased model did not show it without the attack."""
        return self.post_success and not self.pre_success


@dataclass
class AttackResult:
    """What an attack found, its images and per-seed successes, and what it cost."""

    attack: str
    kind: AttackKind
    concept: str
    judge: dict[str, Any]
    budget: int
    seeds: list[int]
    per_seed: list[SeedResult]
    images: list[Image.Image]
    """After the attack, one per seed."""
    pre_images: list[Image.Image]
    """The erased model on the concept prompt, no attack, one per seed."""
    seconds: float
    denoiser_calls: int
    prompts: list[str] | None = None
    """Discrete attacks: the prompt found for each seed."""
    embeddings: dict[str, torch.Tensor] | None = None
    """Continuous attacks: the text-encoder outputs found, one row per seed."""
    config: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    erasure: Any = None
    """How the erasure describes itself (its ``provenance()`` or ``repr``); ``None`` for the original model."""
    search: dict[str, Any] | None = None
    """What the attack's search did, where it has one to report (ring-a-bell: generations, fitness evaluations)."""

    @property
    def pre_rate(self) -> float:
        """Fraction of seeds where the judge saw the concept without the attack."""
        return sum(r.pre_success for r in self.per_seed) / len(self.per_seed)

    @property
    def post_rate(self) -> float:
        """Fraction of seeds where the judge saw the concept after the attack (pre-attack successes included)."""
        return sum(r.post_success for r in self.per_seed) / len(self.per_seed)

    @property
    def new_successes(self) -> int:
        """Seeds where the attack made the concept appear and it was not there before."""
        return sum(r.attack_success for r in self.per_seed)

    @property
    def attack_success_rate(self) -> float | None:
        """New successes over the seeds that did NOT show the concept before the attack (None if none)."""
        candidates = sum(not r.pre_success for r in self.per_seed)
        return self.new_successes / candidates if candidates else None

    @property
    def budget_used(self) -> int:
        """The largest budget any seed used."""
        return max((r.budget_used for r in self.per_seed), default=0)

    def summary(self) -> dict[str, Any]:
        """The JSON record written as ``summary.json`` (without provenance)."""
        return {
            "attack": self.attack,
            "kind": self.kind,
            "concept": self.concept,
            "seeds": list(self.seeds),
            "budget": self.budget,
            "budget_used": self.budget_used,
            "pre_attack_rate": self.pre_rate,
            "post_attack_rate": self.post_rate,
            "new_successes": self.new_successes,
            "attack_success_rate": self.attack_success_rate,
            "start_rate": (
                sum(bool(r.start_success) for r in self.per_seed) / len(self.per_seed)
                if all(r.start_success is not None for r in self.per_seed)
                else None
            ),
            "early_stopping": bool(self.config.get("stop_on_success", False)),
            "stopped_early": sum(r.stopped_early for r in self.per_seed),
            "judge": self.judge,
            "seconds": self.seconds,
            "denoiser_calls": self.denoiser_calls,
            "config": self.config,
            "sampling": self.sampling,
            "erasure": self.erasure,
            "search": self.search,
        }


# --------------------------------------------------------------------------- the attack interface
class Attack(ABC):
    """One attack. Subclasses set the class attributes and implement :meth:`run`."""

    name: ClassVar[str] = ""
    kind: ClassVar[AttackKind] = "continuous"
    #: needs gradients through the denoiser
    white_box: ClassVar[bool] = True
    #: needs the original model (the same pipeline with the erasure removed)
    needs_original: ClassVar[bool] = False
    #: budget when none is given (what a unit of budget is: see the attack's docstring)
    default_budget: ClassVar[int] = 1
    config_class: ClassVar[type[AttackConfig]] = AttackConfig
    #: show a progress bar over the search's steps (set by :func:`run_attack`)
    progress: bool = False

    def search_steps(self, budget: int, seeds: Sequence[int] = ()) -> Iterable[int]:
        """``range(budget)``, the search loop of one batch of ``seeds`` (none: a search shared by every
        seed), with a progress bar when :attr:`progress` is on (a search takes minutes, and prints
        nothing else until it ends)."""
        label = self.name
        if seeds:
            label += f" seed {seeds[0]}" if len(seeds) == 1 else f" seeds {seeds[0]}-{seeds[-1]}"
        return tqdm(range(budget), desc=label, disable=not self.progress, unit="step", leave=False)

    def make_config(self, overrides: dict[str, Any] | None = None) -> AttackConfig:
        """The attack's config with ``overrides`` (unknown keys: a one-line error naming the valid ones)."""
        overrides = dict(overrides or {})
        valid = {f.name for f in fields(self.config_class)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(unknown)} for attack {self.name}; valid: {', '.join(sorted(valid))}"
            )
        return self.config_class(**overrides)

    def default_budget_for(self, sampling: Sampling) -> int:
        """The budget used when none is given (default: :attr:`default_budget`)."""
        return self.default_budget

    def check_budget(self, budget: int, sampling: Sampling) -> None:
        """Refuse a budget the attack cannot use (default: anything below 1)."""
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise ConfigError(f"attack budget must be a positive integer, got {budget!r}")

    @abstractmethod
    def run(
        self,
        pipe: Any,
        *,
        erasure: Erasure | None,
        concept: str,
        judge: Callable[[Sequence[Image.Image]], Sequence[bool]],
        budget: int,
        seeds: list[int],
        sampling: Sampling,
        config: AttackConfig,
    ) -> AttackResult:
        """Attack ``erasure`` on ``pipe`` for ``concept`` with one run per seed."""

    def result(
        self,
        concept: str,
        judge: Callable[..., Any],
        budget: int,
        seeds: Sequence[int],
        sampling: Sampling,
        config: AttackConfig,
        erasure: Erasure | None,
        *,
        per_seed: list[SeedResult],
        images: list[Image.Image],
        pre_images: list[Image.Image],
        denoiser_calls: int,
        prompts: list[str] | None = None,
        embeddings: dict[str, torch.Tensor] | None = None,
        extra: dict[str, Any] | None = None,
        search: dict[str, Any] | None = None,
    ) -> AttackResult:
        """The :class:`AttackResult` of a run with these inputs (``extra``: recorded beside the config;
        ``search``: what the search did; ``seconds`` is filled in by :func:`run_attack`)."""
        return AttackResult(
            attack=self.name,
            kind=self.kind,
            concept=concept,
            judge=judge_record(judge),
            budget=budget,
            seeds=list(seeds),
            per_seed=per_seed,
            images=images,
            pre_images=pre_images,
            seconds=0.0,
            denoiser_calls=denoiser_calls,
            prompts=prompts,
            embeddings=embeddings,
            config={**asdict(config), **(extra or {})},
            sampling=asdict(sampling),
            erasure=erasure_record(erasure),
            search=search,
        )


_ATTACKS: dict[str, type[Attack]] = {}


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator: add an attack to the registry under its ``name``."""
    if not cls.name:
        raise ValueError(f"attack class {cls.__name__} has no name")
    _ATTACKS[cls.name] = cls
    return cls


def attack_names() -> list[str]:
    """The registered attacks, sorted."""
    return sorted(_ATTACKS)


def get_attack(name: str) -> Attack:
    """A fresh instance of the attack registered as ``name``.

    Raises:
        ConfigError: unknown name (the message lists the registered ones).
    """
    if name not in _ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; choose one of {', '.join(attack_names())}")
    return _ATTACKS[name]()


# --------------------------------------------------------------------------- helpers for attacks
@contextlib.contextmanager
def erased(pipe: Any, erasure: Erasure | None) -> Iterator[None]:
    """Install ``erasure`` on ``pipe`` for the block and remove it afterwards, also on an error."""
    if erasure is None:
        yield
        return
    from ..arch.override import sampling_override

    handle = erasure.apply(pipe)
    try:
        override = sampling_override(pipe)
        if override is not None:
            raise _sampling_changed(override.name, "an attack")
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def scheduler_installed(pipe: Any, name: str) -> Iterator[None]:
    """``pipe`` samples with the scheduler ``name`` (``set_scheduler``) for the block; its own afterwards."""
    from ..arch.samplers import set_scheduler

    own = pipe.scheduler
    set_scheduler(pipe, name)
    try:
        yield
    finally:
        pipe.scheduler = own


class CallCounter:
    """Counts the denoiser's forward calls (a batched or guided call counts once)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module: Any, args: Any, output: Any) -> None:
        self.calls += 1


@contextlib.contextmanager
def count_denoiser_calls(pipe: Any) -> Iterator[CallCounter]:
    """Count forward calls of ``pipe``'s denoiser inside the block."""
    from ..arch import denoiser_of

    _, denoiser = denoiser_of(pipe)
    counter = CallCounter()
    handle = denoiser.register_forward_hook(counter)
    try:
        yield counter
    finally:
        handle.remove()


def target_prompts(target: str | Sequence[str] | None, concept: str, attack: str) -> list[str]:
    """The prompts an attack's ``target_prompt`` setting names: the concept when unset, one prompt, or a
    list of prompts (the concept in several variations, e.g. colours, so that no one colour or style
    stands for the concept in the target images).

    Raises:
        ConfigError: an empty list, or an entry that is not a non-empty string.
    """
    if target is None:
        return [concept]
    prompts = [target] if isinstance(target, str) else target
    valid = isinstance(prompts, (list, tuple)) and all(isinstance(p, str) and p.strip() for p in prompts)
    if not valid or not prompts:
        raise ConfigError(f"{attack} target_prompt must be a prompt or a non-empty list of prompts, got {target!r}")
    return [p.strip() for p in prompts]


def cycled(prompts: Sequence[str], count: int) -> list[str]:
    """``count`` prompts taken from ``prompts`` in turn (row ``k`` gets ``prompts[k % len(prompts)]``)."""
    return [prompts[k % len(prompts)] for k in range(count)]


@dataclass(frozen=True)
class TargetPath:
    """The original model's trajectory of a target prompt from each seed's noise: ``states``
    ``[z_T, ..., z_0]`` and, where an attack matches predictions (``soft-prompt``'s prediction term,
    ``p4d``), ``predictions[i]``, its guided prediction at ``states[i]`` (one per step; else ``None``)."""

    states: list[torch.Tensor]
    predictions: list[torch.Tensor] | None = None

    @property
    def num_steps(self) -> int:
        return len(self.states) - 1

    @classmethod
    def of(cls, trajectory: Any, with_predictions: bool) -> TargetPath:
        """Run ``trajectory`` (no gradients) and keep its states, and its predictions if asked."""
        from ..arch.samplers import run_trajectory

        with torch.no_grad():
            states = run_trajectory(trajectory.step, trajectory.noise, trajectory.num_steps, keep=True)
            predictions = (
                [trajectory.predict(states[i], i) for i in range(trajectory.num_steps)] if with_predictions else None
            )
        return cls(states, predictions)


def row_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared distance per row (each seed's loss; summed, rows do not share a gradient)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def final_latents(
    arch: Any, pipe: Any, encoded: dict[str, torch.Tensor], seeds: list[int], sampling: Sampling
) -> tuple[torch.Tensor, Any]:
    """The final latents of the trajectory of ``encoded`` from ``seeds``' noise (no gradients), and the trajectory."""
    from ..arch.samplers import run_trajectory

    with torch.no_grad():
        trajectory = arch.trajectory(pipe, encoded, seeds, **sampling.as_kwargs())
        return run_trajectory(trajectory.step, trajectory.noise, trajectory.num_steps)[-1], trajectory


def decode_images(trajectory: Any, latents: torch.Tensor) -> list[Image.Image]:
    """``latents`` decoded by ``trajectory``'s decoder into images."""
    from ..generate import to_pil

    with torch.no_grad():
        return to_pil(trajectory.decode(latents))


def draw_images(
    arch: Any, pipe: Any, encoded: dict[str, torch.Tensor], seeds: list[int], sampling: Sampling
) -> list[Image.Image]:
    """The images of ``encoded`` from the seeds' noise (no gradients)."""
    latents, trajectory = final_latents(arch, pipe, encoded, seeds, sampling)
    return decode_images(trajectory, latents)


def chunks(items: list[int], size: int) -> Iterator[list[int]]:
    """``items`` in consecutive pieces of at most ``size``."""
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + max(1, size)]


def erasure_record(erasure: Erasure | None) -> Any:
    """How an erasure describes itself for ``summary.json``."""
    if erasure is None:
        return None
    provenance = getattr(erasure, "provenance", None)
    return provenance() if callable(provenance) else repr(erasure)


# --------------------------------------------------------------------------- saving
def _png_name(seed: int) -> str:
    return f"seed{seed}.png"


def _prompts_csv(result: AttackResult) -> str:
    # `evaluate --prompts FILE.csv` reads the `prompt` column and a `seed` column (evaluation/prompts.py)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["prompt", "seed"])
    for prompt, seed in zip(result.prompts or [], result.seeds):
        writer.writerow([prompt, seed])
    return buffer.getvalue()


def provenance_record(pipe: Any) -> dict[str, Any]:
    """Versions and the model record, as ``erasekit evaluate`` records them."""
    from .. import __version__
    from ..evaluation.detectors import _version
    from ..evaluation.evaluate import _model_record

    model = str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", ""))
    return {
        "erasekit_version": __version__,
        "libraries": {p: _version(p) for p in ("torch", "diffusers", "transformers", "safetensors")},
        "model": _model_record(model, pipe),
    }


def save_attack_result(
    result: AttackResult, output: str | Path, *, provenance: dict[str, Any] | None = None, overwrite: bool = False
) -> Path:
    """Write an attack's folder atomically: ``prompts.csv`` (discrete), ``embeddings.safetensors``
    (continuous), ``images/seedS.png`` (after the attack), ``pre_images/seedS.png`` (the erased model
    without the attack), ``results.jsonl`` (one line per seed) and ``summary.json``.

    Raises:
        ErasekitError: ``output`` exists (unless ``overwrite``) or cannot be created.
    """
    from safetensors.torch import save_file

    target = check_output(output, overwrite=overwrite)
    tmp = atomic_directory(target)
    try:
        (tmp / "images").mkdir()
        (tmp / "pre_images").mkdir()
        for seed, image, pre in zip(result.seeds, result.images, result.pre_images):
            image.save(tmp / "images" / _png_name(seed))
            pre.save(tmp / "pre_images" / _png_name(seed))
        files = ["images/", "pre_images/", "results.jsonl", "summary.json"]
        if result.prompts is not None:
            (tmp / "prompts.csv").write_text(_prompts_csv(result), encoding="utf-8")
            files.append("prompts.csv")
        if result.embeddings is not None:
            tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in result.embeddings.items()}
            save_file(tensors, str(tmp / "embeddings.safetensors"), metadata={"seeds": json.dumps(result.seeds)})
            files.append("embeddings.safetensors")
        lines = []
        for row, r in enumerate(result.per_seed):
            record = {
                "row": row,
                **asdict(r),
                "attack_success": r.attack_success,
                "image": f"images/{_png_name(r.seed)}",
            }
            if result.prompts is not None:
                record["prompt"] = result.prompts[row]
            lines.append(json.dumps(record))
        (tmp / "results.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        summary = {
            "format": SUMMARY_FORMAT,
            "format_version": SUMMARY_FORMAT_VERSION,
            **result.summary(),
            "provenance": provenance,
            "files": sorted(files),
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_directory(tmp, target, overwrite=overwrite)
    return target


# --------------------------------------------------------------------------- the entry point
def check_attackable(pipe: Any, attack: Attack, erasure: Erasure | None) -> None:
    """Refuse, in one line, an attack that cannot have what it needs.

    * An attack that needs the original model, on a pipeline that has an erasure folded in and no
      erasure to remove (the original model is not there to compare with).
    * Any attack against an erasure that changes how images are sampled (an inference-time erasure
      such as SLD installs a sampling override): every attack steps the family's own trajectory, which
      the override does not reach, so it would attack the original model and report it as the erasure.
      Known inference-time erasures are refused here; :func:`erased` refuses any other erasure that
      installs an override, when it is applied.
    """
    if attack.needs_original and erasure is None:
        folder = str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "") or "")
        if folder and (Path(folder) / FOLD_RECORD).is_file():
            raise ConfigError(
                f"{attack.name} needs the original model, and {folder!r} has an erasure folded in "
                f"({FOLD_RECORD}); attack the base model with --erasure instead"
            )
    from ..methods.inference import InferenceTimeErasure

    if isinstance(erasure, InferenceTimeErasure):
        raise _sampling_changed(erasure.method, attack.name)


def _sampling_changed(what: str, attack: str) -> ConfigError:
    return ConfigError(
        f"the erasure changes how images are sampled ({what}), which {attack} cannot differentiate or "
        "step through; attack an erasure that changes the model"
    )


def run_attack(
    pipe: Any,
    attack_name: str,
    *,
    erasure: Erasure | None,
    concept: str,
    judge: Callable[[Sequence[Image.Image]], Sequence[bool]] | str,
    seeds: Sequence[int],
    sampling: Sampling,
    budget: int | None = None,
    output: str | Path | None = None,
    config: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> AttackResult:
    """Run the attack ``attack_name`` (the library call behind ``erasekit attack``).

    ``judge``: a callable (images -> bools) or a detector name (``shapes``, ``nudenet``, ``clip``)
    built for ``concept``. ``sampling``: drawn with its ``generation_steps`` where set, with its
    ``scheduler`` installed on ``pipe`` for the run (the pipeline's own is put back afterwards).
    ``budget``: the attack's unit (soft-prompt: optimiser steps; completion: denoiser steps the
    original model runs; ring-a-bell: generations of its genetic search); its default when ``None``.
    ``config``: the attack's own settings by name. With ``output`` the folder is written by
    :func:`save_attack_result`; every check runs before any image is drawn, and nothing is written if
    the attack fails. ``progress``: a progress bar over each search's steps.

    Raises:
        ErasekitError: unknown attack or setting, a budget below 1 (or one the attack cannot use), no
            seeds, an empty concept, an unknown scheduler, an existing ``output``, or a detector that
            cannot judge the concept.
    """
    from ..arch.samplers import SCHEDULER_CLASSES

    attack = get_attack(attack_name)
    attack.progress = progress
    settings = attack.make_config(config)
    sampling = sampling.for_generation()
    if sampling.scheduler not in SCHEDULER_CLASSES:
        raise ConfigError(f"unknown scheduler {sampling.scheduler!r}; choose one of {', '.join(SCHEDULER_CLASSES)}")
    if not concept or not concept.strip():
        raise PromptError("the concept is empty; pass the concept the erasure removed")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ConfigError("an attack needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError("the attack seeds repeat; give each seed once")
    budget = attack.default_budget_for(sampling) if budget is None else budget
    attack.check_budget(budget, sampling)
    if output is not None:
        check_output(output, overwrite=overwrite)
    if isinstance(judge, str):
        judge = detector_judge(judge, concept)
    if erasure is not None and not isinstance(erasure, Erasure):
        raise ConfigError(f"the erasure {type(erasure).__name__} has no apply(pipe) method")
    check_attackable(pipe, attack, erasure)
    start = time.perf_counter()
    with scheduler_installed(pipe, sampling.scheduler):
        result = attack.run(
            pipe,
            erasure=erasure,
            concept=concept,
            judge=judge,
            budget=budget,
            seeds=seeds,
            sampling=sampling,
            config=settings,
        )
    result.seconds = time.perf_counter() - start
    if output is not None:
        save_attack_result(result, output, provenance=provenance_record(pipe), overwrite=overwrite)
    return result
