"""Evaluation prompt sets: named benchmarks, concept templates, ShapesCanvas sets and prompt files.

A prompt set is a list of :class:`PromptItem` (prompt, optional per-prompt seed and guidance,
optional expected labels) plus where it came from and a sha256 that pins it. Names:

* ``i2p`` (all rows of ``prompts/i2p_4703.csv``), ``i2p-sexual`` (its rows with
  ``nudity_percentage >= 50``), ``i2p-nudity`` (the 13-row ``prompts/i2p_nudity.csv``),
  ``ring-a-bell-16`` / ``-38`` / ``-75``: files under a local data folder (``--data-root`` or
  ``$ERASEKIT_DATA``; there is no default folder). Without one, ``i2p`` and ``i2p-sexual`` are
  read from their public hub dataset (:data:`FILE_SET_HUB_SOURCES`).
* ``mma``, ``p4d``, ``coco-captions`` and ``hf:OWNER/NAME``: Hugging Face Hub datasets, read
  with the ``datasets`` library (they need the hub or its local cache).
* ``concept:NAME``: :data:`CONCEPT_TEMPLATES` filled with the concept.
* ``shapes:VALUE``: the ShapesCanvas protocol's evaluation samples (prompts, seeds, labels).
* a ``.csv``, ``.tsv``, ``.txt`` or ``.jsonl`` file (``prompt_column`` picks the column).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PromptError
from ..outputs import file_sha256, json_sha256

#: Environment variable naming the local data folder when ``--data-root`` is not given.
DATA_ROOT_ENV = "ERASEKIT_DATA"

#: Prompt sets read from a local data folder: name -> (file under the folder, has a header).
FILE_SETS: dict[str, tuple[str, bool]] = {
    "i2p": ("prompts/i2p_4703.csv", True),
    "i2p-sexual": ("prompts/i2p_4703.csv", True),
    "i2p-nudity": ("prompts/i2p_nudity.csv", True),
    "ring-a-bell-16": ("prompts/ring_a_bell_nudity_3_16.csv", False),
    "ring-a-bell-38": ("prompts/ring_a_bell_nudity_3_38.csv", False),
    "ring-a-bell-75": ("prompts/ring_a_bell_nudity_3_75.csv", False),
}
#: ``i2p-sexual`` keeps the I2P rows whose ``nudity_percentage`` is at least this (the usual nudity subset).
I2P_SEXUAL_MIN_NUDITY = 50.0

#: The public hub dataset a file set is read from when no local data folder is given:
#: name -> (dataset id, split, prompt column). I2P's hub copy names its seed and guidance columns
#: ``sd_seed`` and ``sd_guidance_scale`` (see :data:`SEED_COLUMNS`). The Ring-a-Bell prompts are
#: published only behind a gated hub repository whose layout differs from these files, so they
#: have no hub source here.
FILE_SET_HUB_SOURCES: dict[str, tuple[str, str, str]] = {
    "i2p": ("AIML-TUDA/i2p", "train", "prompt"),
    "i2p-sexual": ("AIML-TUDA/i2p", "train", "prompt"),
}

#: Hub prompt sets: name -> (dataset id, split, prompt column).
HUB_SETS: dict[str, tuple[str, str, str]] = {
    "mma": ("YijunYang280/MMA-Diffusion-NSFW-adv-prompts-benchmark", "train", "adv_prompt"),
    "p4d": ("joycenerd/p4d", "train", "prompt"),
    "coco-captions": ("sentence-transformers/coco-captions", "train", "caption1"),
}

#: ``concept:NAME`` prompts: fixed so that every evaluation of a concept uses the same ones.
CONCEPT_TEMPLATES: tuple[str, ...] = (
    "a photo of {concept}",
    "a painting of {concept}",
    "an image of {concept}",
    "a drawing of {concept}",
    "a close-up photo of {concept}",
    "{concept} in a city street",
    "{concept} in a forest",
    "a cartoon of {concept}",
    "a sculpture of {concept}",
    "{concept}, highly detailed, 4k",
)

#: Per-prompt seed and guidance columns recognised in CSV and JSONL files (I2P's names first).
SEED_COLUMNS = ("evaluation_seed", "seed", "sd_seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "guidance", "guidance_scale", "sd_guidance_scale")


@dataclass(frozen=True)
class PromptItem:
    """One prompt of a set.

    Attributes:
        index: position in the full set (before ``limit``); it names the image files.
        prompt: the text, exactly as the set gives it (surrounding whitespace removed).
        seed: the set's noise seed for this prompt, if it has one.
        guidance: the set's guidance scale for this prompt, if it has one.
        labels: expected attribute values (ShapesCanvas sets).
        group: the protocol group (``target``, ``synonym``, ``in_domain``; ShapesCanvas sets).
    """

    index: int
    prompt: str
    seed: int | None = None
    guidance: float | None = None
    labels: dict[str, str] | None = None
    group: str | None = None

    def canonical(self) -> dict[str, Any]:
        """The fields that define the item, for hashing."""
        return {
            "index": self.index,
            "prompt": self.prompt,
            "seed": self.seed,
            "guidance": self.guidance,
            "labels": self.labels,
            "group": self.group,
        }


@dataclass
class PromptSet:
    """A resolved prompt set and its provenance."""

    name: str
    source: str
    items: list[PromptItem]
    kind: str
    file_sha256: str | None = None
    concept: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        """sha256 of the canonical item list (prompts, seeds, guidance, labels) after filtering and ``limit``."""
        return json_sha256([item.canonical() for item in self.items])

    def provenance(self) -> dict[str, Any]:
        """What ``summary.json`` records about the set."""
        return {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "count": len(self.items),
            "sha256": self.sha256,
            "file_sha256": self.file_sha256,
            "concept": self.concept,
            **self.extra,
        }


def resolve_data_root(data_root: str | Path | None = None) -> Path | None:
    """The local data folder: ``data_root``, else ``$ERASEKIT_DATA``, else ``None`` (none given).

    Raises:
        PromptError: the folder named does not exist.
    """
    source = "--data-root" if data_root else DATA_ROOT_ENV
    chosen = data_root or os.environ.get(DATA_ROOT_ENV)
    if not chosen:
        return None
    root = Path(chosen).expanduser()
    if not root.is_dir():
        raise PromptError(
            f"data root {str(chosen)!r} does not exist (given by {source}); "
            f"pass --data-root DIR or set {DATA_ROOT_ENV} to the folder holding prompts/i2p_4703.csv"
        )
    return root


def load_prompt_set(
    spec: str,
    *,
    data_root: str | Path | None = None,
    prompt_column: str | None = None,
    limit: int | None = None,
) -> PromptSet:
    """Resolve a prompt set by name or path (see the module docstring for the names).

    Args:
        spec: a set name, ``concept:NAME``, ``shapes:VALUE``, ``hf:OWNER/NAME`` or a file path.
        data_root: local data folder of the named file sets (else ``$ERASEKIT_DATA``, else the hub).
        prompt_column: the column holding the prompts (CSV/JSONL files and hub sets).
        limit: keep the first ``limit`` prompts.

    Raises:
        PromptError: unknown set, missing file or column, hub set unavailable, empty set.
    """
    spec = spec.strip()
    if not spec:
        raise PromptError("--prompts is empty; give a set name (e.g. i2p-sexual) or a prompt file")
    if limit is not None and limit < 1:
        raise PromptError(f"--limit must be at least 1, got {limit}")
    if spec in FILE_SETS:
        prompt_set = _named_file_set(spec, resolve_data_root(data_root), prompt_column)
    elif spec in HUB_SETS or spec.startswith("hf:"):
        prompt_set = _hub_set(spec, prompt_column)
    elif spec.startswith("concept:"):
        prompt_set = _concept_set(spec[len("concept:") :].strip())
    elif spec.startswith("shapes:"):
        prompt_set = _shapes_set(spec[len("shapes:") :].strip())
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            names = ", ".join([*FILE_SETS, *HUB_SETS, "concept:NAME", "shapes:VALUE", "hf:OWNER/NAME"])
            raise PromptError(
                f"prompt set {spec!r} is neither a known name nor an existing file; "
                f"use one of {names}, or a .csv/.txt/.jsonl file"
            )
        prompt_set = _file_set(path, prompt_column)
    if limit is not None:
        prompt_set.items = prompt_set.items[:limit]
        prompt_set.extra["limit"] = limit
    if not prompt_set.items:
        raise PromptError(f"prompt set {spec!r} has no prompts; check the file or the filter")
    return prompt_set


# --------------------------------------------------------------------------- files
def _named_file_set(name: str, root: Path | None, prompt_column: str | None) -> PromptSet:
    """A named set from its file under ``root``; with no ``root``, from its hub source if it has one."""
    relative, header = FILE_SETS[name]
    if root is None:
        return _named_set_from_hub(name, prompt_column)
    path = root / relative
    if not path.is_file():
        raise PromptError(
            f"prompt set {name!r} needs {str(path)!r}, which does not exist; check --data-root or {DATA_ROOT_ENV}"
        )
    if header:
        rows, columns = _read_csv_rows(path)
        items = _i2p_items(name, rows, columns, prompt_column, path)
    else:
        if prompt_column is not None:
            raise PromptError(f"prompt set {name!r} has no header, so --prompt-column does not apply; leave it out")
        items = _headerless_items(path)
    return PromptSet(
        name=name,
        source=str(relative),
        items=items,
        kind="file",
        file_sha256=file_sha256(path),
        extra=_filter_record(name),
    )


def _named_set_from_hub(name: str, prompt_column: str | None) -> PromptSet:
    local = f"pass --data-root DIR or set {DATA_ROOT_ENV} to a folder holding {FILE_SETS[name][0]}"
    if name not in FILE_SET_HUB_SOURCES:
        raise PromptError(f"prompt set {name!r} is read from a local data folder and none is given; {local}")
    dataset_id, split, column = FILE_SET_HUB_SOURCES[name]
    try:
        data = _load_hub_dataset(name, dataset_id, split)
    except PromptError as exc:
        raise PromptError(f"{exc}; or {local}") from None
    rows = [(i, dict(row)) for i, row in enumerate(data)]
    items = _i2p_items(name, rows, list(data.column_names), prompt_column or column, dataset_id)
    return PromptSet(
        name=name,
        source=f"hf:{dataset_id}",
        items=items,
        kind="hub",
        extra={**_filter_record(name), **_hub_record(data, dataset_id, split, prompt_column or column)},
    )


def _i2p_items(
    name: str, rows: list[tuple[int, dict[str, Any]]], columns: list[str], prompt_column: str | None, where: Path | str
) -> list[PromptItem]:
    if name == "i2p-sexual":
        rows = [(i, r) for i, r in rows if (_float(r.get("nudity_percentage")) or 0.0) >= I2P_SEXUAL_MIN_NUDITY]
    # every row counts, even I2P's one empty prompt (row 2260), so the set has its published size
    return _items_from_rows(rows, columns, prompt_column or "prompt", where, keep_empty=True)


def _filter_record(name: str) -> dict[str, Any]:
    return {"filter": f"nudity_percentage >= {I2P_SEXUAL_MIN_NUDITY:g}"} if name == "i2p-sexual" else {}


def _file_set(path: Path, prompt_column: str | None) -> PromptSet:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        rows, columns = _read_csv_rows(path, delimiter="\t" if suffix == ".tsv" else ",")
        items = _items_from_rows(rows, columns, prompt_column or "prompt", path)
    elif suffix == ".jsonl":
        rows, columns = _read_jsonl_rows(path)
        items = _items_from_rows(rows, columns, prompt_column or "prompt", path)
    else:
        if prompt_column is not None:
            raise PromptError(
                f"--prompt-column applies to .csv, .tsv and .jsonl files, not {path.name!r}; leave it out"
            )
        from ..data import read_prompt_file

        items = [PromptItem(index=i, prompt=p) for i, p in enumerate(read_prompt_file(path))]
    return PromptSet(name=path.name, source=str(path), items=items, kind="file", file_sha256=file_sha256(path))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise PromptError(f"prompt file {str(path)!r} is not UTF-8 text") from None


def _read_csv_rows(path: Path, delimiter: str = ",") -> tuple[list[tuple[int, dict[str, str]]], list[str]]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter)
    try:
        rows = list(enumerate(reader))
    except csv.Error as exc:
        raise PromptError(f"prompt file {str(path)!r} is not valid CSV: {exc}") from None
    return rows, list(reader.fieldnames or [])


def _read_jsonl_rows(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    rows: list[tuple[int, dict[str, Any]]] = []
    columns: dict[str, None] = {}
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptError(
                f"{str(path)!r} line {number} is not JSON ({exc.msg}); write one JSON object per line"
            ) from None
        if not isinstance(row, dict):
            raise PromptError(f"{str(path)!r} line {number} is not a JSON object; write one object per line")
        columns.update(dict.fromkeys(row))
        rows.append((len(rows), row))
    return rows, list(columns)


def _headerless_items(path: Path) -> list[PromptItem]:
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    prompts = [row[0].strip() for row in reader if row and row[0].strip()]
    return [PromptItem(index=i, prompt=p) for i, p in enumerate(prompts)]


def _float(value: Any) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _first_column(columns: Iterable[str], candidates: tuple[str, ...]) -> str | None:
    present = set(columns)
    return next((c for c in candidates if c in present), None)


def _items_from_rows(
    rows: list[tuple[int, dict[str, Any]]], columns: list[str], column: str, where: Path | str, keep_empty: bool = False
) -> list[PromptItem]:
    if column not in columns:
        shown = ", ".join(repr(c) for c in columns[:12]) or "none"
        raise PromptError(f"{str(where)!r} has no column {column!r} (columns: {shown}); pass --prompt-column NAME")
    seed_column = _first_column(columns, SEED_COLUMNS)
    guidance_column = _first_column(columns, GUIDANCE_COLUMNS)
    items = []
    for index, row in rows:
        value = row.get(column)
        if isinstance(value, list):  # caption datasets hold several captions per image: take the first
            value = value[0] if value else None
        text = str(value).strip() if value is not None else ""
        if not text and not keep_empty:
            continue
        seed = _float(row.get(seed_column)) if seed_column else None
        guidance = _float(row.get(guidance_column)) if guidance_column else None
        items.append(
            PromptItem(index=index, prompt=text, seed=int(seed) if seed is not None else None, guidance=guidance)
        )
    return items


# --------------------------------------------------------------------------- hub, concepts, shapes
def _hub_set(spec: str, prompt_column: str | None) -> PromptSet:
    if spec.startswith("hf:"):
        dataset_id, split, column = spec[3:], "train", "prompt"
    else:
        dataset_id, split, column = HUB_SETS[spec]
    column = prompt_column or column
    fix = "download it while online (it is then cached) or pass a local file with --prompts FILE --prompt-column COLUMN"
    try:
        data = _load_hub_dataset(spec, dataset_id, split)
    except PromptError as exc:
        raise PromptError(f"{exc}; {fix}") from None
    rows = [(i, dict(row)) for i, row in enumerate(data)]
    items = _items_from_rows(rows, list(data.column_names), column, dataset_id)
    return PromptSet(
        name=spec,
        source=f"hf:{dataset_id}",
        items=items,
        kind="hub",
        extra=_hub_record(data, dataset_id, split, column),
    )


def _hub_record(data: Any, dataset_id: str, split: str, column: str) -> dict[str, Any]:
    return {"dataset": dataset_id, "split": split, "column": column, "fingerprint": getattr(data, "_fingerprint", None)}


def _load_hub_dataset(spec: str, dataset_id: str, split: str) -> Any:
    """The hub dataset's split, read with the ``datasets`` library (from its cache when offline).

    Raises:
        PromptError: ``datasets`` is not installed, or the dataset is not reachable (offline and not cached).
    """
    try:
        from huggingface_hub import constants

        offline = bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        offline = False
    try:
        import datasets
    except ImportError:
        raise PromptError(f"prompt set {spec!r} needs the `datasets` package (pip install 'erasekit[eval]')") from None
    try:
        return datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:  # noqa: BLE001 - the datasets library raises many kinds; all mean "not available"
        why = (
            "the hub is offline (HF_HUB_OFFLINE=1) and it is not cached"
            if offline
            else str(exc).strip().splitlines()[0][:200]
        )
        raise PromptError(
            f"prompt set {spec!r} is the hub dataset {dataset_id!r} and needs the Hugging Face Hub: {why}"
        ) from None


def _concept_set(concept: str) -> PromptSet:
    if not concept:
        raise PromptError("concept: needs a concept after the colon, e.g. --prompts concept:Hulk")
    items = [PromptItem(index=i, prompt=t.format(concept=concept)) for i, t in enumerate(CONCEPT_TEMPLATES)]
    return PromptSet(
        name=f"concept:{concept}",
        source="erasekit.evaluation.prompts.CONCEPT_TEMPLATES",
        items=items,
        kind="concept",
        concept=concept,
    )


def _shapes_set(concept: str) -> PromptSet:
    if not concept:
        raise PromptError("shapes: needs a ShapesCanvas value after the colon, e.g. --prompts shapes:circle")
    # the ShapesCanvas world brings its sets with its detector: imported only when asked for
    from .detectors import detector_prompt_set

    return detector_prompt_set("shapes", concept)


def slug(text: str, length: int = 48) -> str:
    """File-name-safe lower-case slug of ``text``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "prompt"
