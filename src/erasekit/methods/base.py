"""The erasure interface every method plugs into, its registry, and the one artefact format.

A :class:`Method` *fits* on a loaded pipeline and a concept (``fit``) and returns an :class:`Erasure`.
An erasure applies to a loaded pipeline and is removed again exactly (``apply`` returns a handle whose
``remove()`` restores the original outputs), saves into and loads from an artefact folder, folds into
a stock diffusers pipeline where that is meaningful, and reports its :class:`Cost`.

Methods register by name with :func:`register_method` (as peft registers its tuners); generic code
(the CLI, evaluation, the demo) looks them up with :func:`get_method` or through the ``method`` field
of an artefact, and never branches on a method's name.

The artefact is a folder: ``erasure.json`` (:data:`FORMAT`, :data:`FORMAT_VERSION`, the method, the
base model's id and config hash, the concept(s), anchor, resolved settings, generation defaults, the
cost and the sha256 of every payload file) and the method's payload files.
"""

from __future__ import annotations

import json
import resource
import shutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol

from torch import nn

from .. import __version__
from ..arch import architecture_for, denoiser_of
from ..config import EraseConfig
from ..data import concept_entries
from ..errors import (
    ErasekitError,
    ErasureFileError,
    ErasureMismatchError,
    UnknownMethodError,
    UnsupportedError,
)
from ..outputs import atomic_directory, check_output, commit_directory, file_sha256, json_sha256
from ..pipeline import load_pipeline
from ..training.run import make_accelerator, staging_path

FORMAT = "erasekit-erasure"
FORMAT_VERSION = 1
RECORD_NAME = "erasure.json"
#: What a folded pipeline folder records about the erasure baked into it.
FOLD_RECORD = "erasekit_fold.json"


# --------------------------------------------------------------------------- records and costs
@dataclass
class Cost:
    """What an erasure cost and changed."""

    changes: str = ""
    """What it changed, in words (the method's :attr:`Method.changes`)."""
    units_changed: int = 0
    """Units masked (heads, neurons, channels), or 0 for a method that edits weights."""
    units_total: int = 0
    parameters_changed: int = 0
    """Base-model parameters replaced (weight-editing methods); 0 for masks and inference-time methods."""
    seconds: float = 0.0
    """Wall time of ``fit``."""
    peak_memory_bytes: int = 0
    """Peak accelerator memory during ``fit`` (CUDA), else the process's peak resident memory."""
    artifact_bytes: int = 0
    """Size of the payload files."""
    extra_denoiser_calls_per_step: float = 0.0
    """Inference-time methods: denoiser evaluations (one latent row each) added per image and sampling step,
    on average, over the default sampler at the same guidance (SLD: 1, the safety concept's row)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Cost:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_memory_bytes(device: Any = None) -> int:
    """The peak memory so far: CUDA's allocator peak on a CUDA device, else this process's peak RSS."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def denoiser_config_hash(denoiser: nn.Module) -> str:
    """sha256 of the denoiser's public config (class name included), independent of key order."""
    config = {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")}
    config["_class_name"] = type(denoiser).__name__
    return json_sha256(config, ensure_ascii=True, default=list)


def base_model_record(denoiser: nn.Module, model_id: str, revision: str | None = None) -> dict[str, Any]:
    """What an artefact records about the model it was made on."""
    return {
        "id": model_id,
        "revision": revision,
        "denoiser_class": type(denoiser).__name__,
        "denoiser_config_sha256": denoiser_config_hash(denoiser),
    }


def check_model(record: dict[str, Any], denoiser: nn.Module, where: str) -> None:
    """Refuse an artefact made for another model (another denoiser class or config).

    Raises:
        ErasureMismatchError: naming both models.
    """
    base = record.get("base_model", {})
    trained_on = base.get("denoiser_class")
    here = type(denoiser).__name__
    if trained_on and trained_on != here:
        raise ErasureMismatchError(f"{where} was made for a {trained_on} (model {base.get('id')!r}), not this {here}")
    # same class and width but another depth (or any other config change) can fit every key and shape
    recorded, actual = base.get("denoiser_config_sha256"), denoiser_config_hash(denoiser)
    if recorded and recorded != actual:
        raise ErasureMismatchError(
            f"{where} was made for another {here} (model {base.get('id')!r}, denoiser config sha256 {recorded[:12]}), "
            f"not this one (model {denoiser.config.get('_name_or_path', '?')!r}, sha256 {actual[:12]}); "
            "use the model it was made on"
        )


def generation_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """Sampling settings to generate with: the fit's, with ``sampling.generation_steps`` as the steps where set."""
    sampling = dict(settings.get("sampling", {}))
    generation_steps = sampling.pop("generation_steps", None)
    if generation_steps is not None:
        sampling["steps"] = generation_steps
    return sampling


def concept_fields(config: EraseConfig) -> dict[str, Any]:
    """The record's concept fields: ``concept`` and ``anchor`` (the first concept's), ``concepts`` (every
    concept erased) and, where there are several, ``anchors`` (theirs, in the same order)."""
    concept = config.concept
    fields_ = {
        "concept": concept.concept,
        "concepts": [concept.concept] if concept.concept else [],
        "anchor": concept.anchor,
    }
    if concept.more_concepts:
        entries = concept_entries(concept)
        fields_["concepts"] = [name for name, _ in entries]
        fields_["anchors"] = [anchor for _, anchor in entries]
    return fields_


def write_record(folder: Path, record: dict[str, Any], payload: Sequence[str]) -> dict[str, Any]:
    """Write ``erasure.json`` into ``folder`` beside the already written ``payload`` files.

    Adds the format fields, the sha256 of every payload file and their size (``cost.artifact_bytes``).
    Returns the record written.
    """
    hashes = {name: file_sha256(folder / name) for name in payload}
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "erasekit_version": __version__}
    # a record read from an older artefact brings its own format fields: this one is written in today's
    full = {**header, **{k: v for k, v in record.items() if k not in header}}
    full["payload"] = hashes
    full["cost"] = {**dict(full.get("cost") or {}), "artifact_bytes": sum((folder / n).stat().st_size for n in payload)}
    (folder / RECORD_NAME).write_text(json.dumps(full, indent=2, sort_keys=False, default=str))
    return full


def check_format_version(record: dict[str, Any], record_file: Path) -> None:
    """Refuse an artefact written in a newer format than this erasekit reads (docs/design.md, the
    version rule); every older version stays readable. A record without the field is version 1."""
    version = record.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ErasureFileError(f"{record_file} has format_version {version!r}; expected a positive integer")
    if version > FORMAT_VERSION:
        raise ErasureFileError(
            f"{record_file} has format_version {version}, newer than the version {FORMAT_VERSION} that "
            f"erasekit {__version__} reads; upgrade erasekit to load it"
        )


def read_json_object(file: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``file``; anything else is a one-line :class:`ErasureFileError`."""
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ErasureFileError(f"{file} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ErasureFileError(f"{file} cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise ErasureFileError(f"{file} is not an erasekit {what} (a JSON {type(data).__name__}, not an object)")
    return data


def read_record(folder: Path) -> dict[str, Any]:
    """Read and check ``erasure.json``: its format and version, and every payload file's sha256.

    Raises:
        ErasureFileError: a missing or corrupt record, a newer format, a missing or changed payload file.
    """
    record_file = folder / RECORD_NAME
    record = read_json_object(record_file, "erasure record")
    if record.get("format") != FORMAT:
        raise ErasureFileError(f"{record_file} is not an erasekit erasure record (format {record.get('format')!r})")
    check_format_version(record, record_file)
    payload = record.get("payload", {})
    if not isinstance(payload, dict):
        raise ErasureFileError(f"{record_file}: payload must map file names to sha256, got {payload!r}")
    for name, digest in payload.items():
        file = folder / name
        if Path(name).name != name or not file.is_file():
            raise ErasureFileError(f"erasure folder {str(folder)!r} has no {name}; the artefact is incomplete")
        if file_sha256(file) != digest:
            raise ErasureFileError(
                f"{file} does not match the sha256 recorded in {RECORD_NAME}; the payload is corrupt or was changed"
            )
    return record


# --------------------------------------------------------------------------- the interface
class ErasureHandle(Protocol):
    """What :meth:`Erasure.apply` returns: ``remove()`` restores the pipeline's original outputs exactly."""

    def remove(self) -> None: ...


class Erasure(ABC):
    """A fitted erasure: a record (``erasure.json``'s content) and the method's payload.

    Subclasses set :attr:`method`, :attr:`payload` (file names), :attr:`foldable` and
    :attr:`fold_modes`, and implement :meth:`apply`, :meth:`write_payload` and :meth:`from_folder`.
    """

    method: ClassVar[str] = ""
    payload: ClassVar[tuple[str, ...]] = ()
    foldable: ClassVar[bool] = False
    fold_modes: ClassVar[tuple[str, ...]] = ()
    #: A record file of an older artefact format of this method that :func:`load_erasure` still reads.
    legacy_record: ClassVar[str | None] = None

    def __init__(self, record: dict[str, Any], path: Path | None = None) -> None:
        self.record = record
        self.path = path

    @property
    def where(self) -> str:
        return f"erasure {str(self.path)!r}" if self.path else f"{self.method} erasure"

    @property
    def cost(self) -> Cost:
        return Cost.from_dict(self.record.get("cost"))

    @property
    def generation_defaults(self) -> dict[str, Any]:
        """The sampling settings ``generate`` and ``evaluate`` default to."""
        recorded = self.record.get("generation")
        return dict(recorded) if isinstance(recorded, dict) else generation_defaults(self.record.get("settings", {}))

    def provenance(self) -> dict[str, Any]:
        """What pins this erasure's folder: the method, the sha256 of its payload (``sha256``: of the one
        payload file, else of the name -> sha256 map) and of its record file (``config_sha256``)."""
        if self.path is None:
            return {"method": self.method}
        payload = {name: file_sha256(self.path / name) for name in self.payload if (self.path / name).is_file()}
        record_file = self.path / RECORD_NAME
        if not record_file.is_file() and self.legacy_record:
            record_file = self.path / self.legacy_record
        digest = next(iter(payload.values())) if len(payload) == 1 else json_sha256(payload)
        return {"method": self.method, "sha256": digest, "config_sha256": file_sha256(record_file)}

    def changed_text(self) -> str:
        """What this erasure changed, in a few words (the CLI's summary line)."""
        return self.cost.changes or self.method

    def report(self) -> dict[str, Any]:
        """The method's own numbers for a report such as the demo's ``metrics.json`` (default: none)."""
        return {}

    def check(self, pipe: Any) -> None:
        """Refuse a pipeline of another model than the one this erasure was made on."""
        check_model(self.record, denoiser_of(pipe)[1], self.where)

    @abstractmethod
    def apply(self, pipe: Any) -> ErasureHandle:
        """Apply to a loaded pipeline; the handle's ``remove()`` restores its original outputs exactly."""

    def check_foldable(self, mode: str) -> None:
        """Refuse in one line a fold this erasure cannot do (an inference-time method, another mode)."""
        if not self.foldable:
            raise UnsupportedError(
                f"a {self.method} erasure changes sampling, not weights, and cannot be folded; "
                "use it with `erasekit generate --erasure` or `erasekit evaluate --erasure`"
            )
        if mode not in self.fold_modes:
            raise UnsupportedError(
                f"a {self.method} erasure folds with --mode {' or '.join(self.fold_modes)}, not {mode!r}"
            )

    def fold(self, pipe: Any, mode: str) -> Any:
        """Bake the erasure into ``pipe``'s weights (in place); returns the pipeline."""
        self.check_foldable(mode)
        raise NotImplementedError(f"{type(self).__name__} is foldable but does not implement fold")

    @classmethod
    def combine(cls, erasures: list[Erasure]) -> Erasure:
        """One erasure doing what ``erasures`` (all of this class) do together; by default only one."""
        if len(erasures) == 1:
            return erasures[0]
        raise UnsupportedError(f"{cls.method} erasures do not combine; apply one at a time")

    @abstractmethod
    def write_payload(self, folder: Path) -> None:
        """Write the payload files (:attr:`payload`) into the existing ``folder``."""

    @classmethod
    @abstractmethod
    def from_folder(cls, folder: Path, record: dict[str, Any]) -> Erasure:
        """Build the erasure from a checked ``record`` and the payload files in ``folder``."""

    @classmethod
    def from_legacy(cls, folder: Path) -> Erasure:
        """Read an artefact of an older format (the one :attr:`legacy_record` names)."""
        raise ErasureFileError(f"{folder} has no {RECORD_NAME}")

    def write(self, folder: Path) -> dict[str, Any]:
        """Write payload and record into the existing ``folder`` (a staging folder); returns the record."""
        self.write_payload(folder)
        self.record = write_record(folder, self.record, self.payload)
        return self.record

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write the artefact folder atomically (temporary folder, then rename)."""
        target = Path(folder)
        tmp = atomic_directory(target)
        try:
            self.write(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        commit_directory(tmp, target, overwrite=overwrite)
        self.path = target
        return target

    @classmethod
    def load(cls, folder: str | Path) -> Erasure:
        """Load an artefact folder, which must hold an erasure of this class."""
        erasure = load_erasure(folder)
        if not isinstance(erasure, cls):
            raise ErasureFileError(f"{str(folder)!r} holds a {erasure.method} erasure, not a {cls.method} one")
        return erasure


class Method(ABC):
    """An erasure method: its settings, what it changes, the families it supports, and ``fit``.

    Class attributes describe it (``erasekit methods`` lists them); :func:`register_method` adds it to
    the registry under :attr:`name`.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    """The dataclass of its settings: the :class:`~erasekit.config.EraseConfig` section :attr:`section`."""
    section: ClassVar[str] = ""
    """The EraseConfig attribute holding its settings (default: :attr:`name`, dashes as underscores)."""
    erasure_class: ClassVar[type[Erasure]] = Erasure
    trains: ClassVar[bool] = False
    needs_cfg: ClassVar[bool] = False
    changes: ClassVar[str] = ""
    families: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""
    several_concepts: ClassVar[bool] = False
    """Whether one fit erases several concepts (``concept.more_concepts``); a method that cannot refuses them."""

    def settings(self, config: EraseConfig) -> Any:
        """This method's settings in ``config`` (an instance of :attr:`config_class`)."""
        return getattr(config, self.section or self.name.replace("-", "_"))

    def check_family(self, arch: Any) -> None:
        """Refuse, in one line, a model family this method does not support."""
        if arch.family not in self.families:
            raise UnsupportedError(
                f"method {self.name!r} does not support the {arch.family} family; "
                f"it supports: {', '.join(self.families)}"
            )

    def check_concepts(self, count: int) -> None:
        """Refuse, in one line, ``count`` > 1 concepts for a method that erases one at a time."""
        if count > 1 and not self.several_concepts:
            able = ", ".join(n for n in available_methods() if _METHODS[n].several_concepts)
            raise UnsupportedError(
                f"method {self.name!r} erases one concept at a time, and {count} were given; "
                f"erase them one by one, or use a method that erases several at once ({able})"
            )

    def validate(self, config: EraseConfig) -> None:  # noqa: B027  (optional hook)
        """Refuse settings this method cannot run with, before any weights are loaded (default: none)."""

    @abstractmethod
    def fit(
        self,
        pipe: Any,
        config: EraseConfig,
        output: str | Path,
        *,
        accelerator: Any = None,
        resume: bool = False,
        stop_after: int | None = None,
        model_id: str | None = None,
    ) -> Erasure:
        """Fit the erasure of ``config.concept`` on ``pipe``; write its artefact to ``output``.

        Args:
            pipe: a loaded pipeline of a supported family, on the accelerator's device.
            config: the resolved configuration (its method section and the shared ones).
            output: the artefact folder to create (must not exist).
            accelerator: shared with the caller (who placed the pipeline on its device); methods that
                need one create it when ``None``.
            resume: continue an interrupted run (iterative methods).
            stop_after: stop after this many steps without writing the artefact (iterative methods; tests).
            model_id: recorded in the artefact (default ``config.model.id``).
        """

    def describe(self) -> dict[str, Any]:
        """What ``erasekit methods`` prints about this method."""
        return {
            "name": self.name,
            "changes": self.changes,
            "trains": self.trains,
            "needs_cfg": self.needs_cfg,
            "families": list(self.families),
            "several_concepts": self.several_concepts,
            "summary": self.summary,
        }


# --------------------------------------------------------------------------- the registry
_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Register a :class:`Method` subclass under its ``name`` (usable as a class decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is registered already ({_METHODS[cls.name].__name__})")
    if not cls.erasure_class.method:
        raise ValueError(f"{cls.__name__}.erasure_class must set its method name")
    _METHODS[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    """The registered method ``name``.

    Raises:
        UnknownMethodError: listing the valid names.
    """
    cls = _METHODS.get(name)
    if cls is None:
        raise UnknownMethodError(f"unknown method {name!r}; available methods: {', '.join(available_methods())}")
    return cls()


def _erasure_class(method_name: Any, where: Path) -> type[Erasure]:
    cls = _METHODS.get(method_name) if isinstance(method_name, str) else None
    if cls is None:
        raise ErasureFileError(
            f"{where} is an erasure of method {method_name!r}, which this erasekit does not know "
            f"(available: {', '.join(available_methods())}); upgrade erasekit to load it"
        )
    return cls.erasure_class


# --------------------------------------------------------------------------- loading, applying, folding
def load_erasure(path: str | Path) -> Erasure:
    """Load an erasure artefact folder of any registered method (and the older mask folders).

    Raises:
        ErasureFileError: a missing folder, a missing or corrupt record or payload, a newer format, an
            unknown method.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ErasureFileError(
            f"erasure folder {str(folder)!r} does not exist; pass the --output folder of `erasekit erase`"
        )
    if (folder / RECORD_NAME).is_file():
        record = read_record(folder)
        return _erasure_class(record.get("method"), folder / RECORD_NAME).from_folder(folder, record)
    for method in _METHODS.values():
        legacy = method.erasure_class.legacy_record
        if legacy and (folder / legacy).is_file():
            return method.erasure_class.from_legacy(folder)
    raise ErasureFileError(f"erasure folder {str(folder)!r} has no {RECORD_NAME}; it is not an erasekit erasure")


def combine_erasures(erasures: list[Erasure]) -> list[Erasure]:
    """Group erasures by class and combine each group (a class's own rule; masks: logical AND)."""
    groups: dict[type[Erasure], list[Erasure]] = {}
    for erasure in erasures:
        groups.setdefault(type(erasure), []).append(erasure)
    return [cls.combine(group) for cls, group in groups.items()]


class _Handles:
    """Several applied erasures; ``remove()`` undoes them in reverse order."""

    def __init__(self, handles: list[ErasureHandle]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in reversed(self.handles):
            handle.remove()
        self.handles = []


def apply_erasures(pipe: Any, paths: Sequence[str | Path]) -> ErasureHandle:
    """Load erasure folders, check them against ``pipe``, combine them where their method allows, apply.

    Returns a handle whose ``remove()`` restores the pipeline's original outputs exactly.
    """
    erasures = [load_erasure(p) for p in paths]
    for erasure in erasures:
        erasure.check(pipe)
    combined = combine_erasures(erasures)
    if len(combined) == 1:
        return combined[0].apply(pipe)
    handles: list[ErasureHandle] = []
    try:
        for erasure in combined:
            handles.append(erasure.apply(pipe))
    except BaseException:
        _Handles(handles).remove()
        raise
    return _Handles(handles)


def fold_erasures(pipe: Any, paths: Sequence[str | Path], mode: str) -> Any:
    """Bake erasure folders into ``pipe``'s weights (in place); returns the pipeline.

    Raises:
        UnsupportedError: an erasure that cannot be folded (inference-time methods), or an unknown mode.
    """
    erasures = [load_erasure(p) for p in paths]
    for erasure in erasures:
        erasure.check(pipe)
    combined = combine_erasures(erasures)
    for erasure in combined:
        erasure.check_foldable(mode)
    for erasure in combined:
        erasure.fold(pipe, mode)
    return pipe


def save_folded_pipeline(pipe: Any, output: str | Path, mode: str, provenance: dict[str, Any] | None = None) -> Path:
    """``save_pretrained`` a folded pipeline atomically; with ``mode="prune"`` also ship the pruned
    denoiser's component code, so that stock diffusers loads it with ``trust_remote_code=True``."""
    arch, denoiser = denoiser_of(pipe)
    target = Path(output)
    if target.exists():
        raise FileExistsError(f"output {str(target)!r} already exists; choose another --output or remove it")
    tmp = atomic_directory(target)
    try:
        arch.before_save(pipe)
        pipe.save_pretrained(tmp, safe_serialization=True)
        if mode == "prune":
            component = arch.pruned_component_source()
            shutil.copy(component, tmp / arch.denoiser_attr / component.name)
            index_file = tmp / "model_index.json"
            index = json.loads(index_file.read_text())
            index[arch.denoiser_attr] = [component.stem, type(denoiser).__name__]
            index_file.write_text(json.dumps(index, indent=2))
        if provenance is not None:
            (tmp / FOLD_RECORD).write_text(json.dumps({"mode": mode, **provenance}, indent=2, default=str))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_directory(tmp, target)
    return target


# --------------------------------------------------------------------------- the library's erase
def erase(config: EraseConfig, output: str | Path, *, resume: bool = False, stop_after: int | None = None) -> Erasure:
    """Load ``config.model``, fit ``config.method`` on it, write the artefact to ``output``.

    Example:
        >>> from erasekit.config import load_config
        >>> cfg = load_config("configs/flux-schnell.yaml", ["concept.concept=Hulk", "concept.anchor=a man"])
        >>> erase(cfg, "erasures/hulk")  # doctest: +SKIP
    """
    method = get_method(config.method)
    method.check_concepts(1 + len(config.concept.more_concepts))
    method.validate(config)  # bad settings fail before any weights are loaded
    output = Path(output)
    check_output(output)
    staging = staging_path(output)
    if staging.exists() and not resume:
        raise ErasekitError(f"{staging} holds an interrupted run; pass --resume to continue it, or remove that folder")
    accelerator = make_accelerator(config, staging)
    try:
        pipe = load_pipeline(config.model.id, config.model.dtype, str(accelerator.device), config.model.revision)
        method.check_family(architecture_for(pipe))
        return method.fit(pipe, config, output, accelerator=accelerator, resume=resume, stop_after=stop_after)
    finally:
        accelerator.state.destroy_process_group()  # fit finished the trackers
