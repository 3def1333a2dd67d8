"""The spread of a recipe: the same demo erasure with several training seeds and thread counts.

Mask training is chaotic (a different last bit in one gradient ends on another mask), so one run of a
recipe says little about the next. :func:`run_spread` trains the recipe once per training seed and
thread count, scores every run on the same evaluation draw (the original model's images come from the
image cache after the first run), and reports mean, standard deviation and worst case of every metric,
and how many runs meet the demo's bar. Each run is a normal demo folder under ``runs/``; a run whose
folder is complete is read back instead of trained again, so an interrupted spread resumes where it
stopped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ..errors import ErasekitError
from ..outputs import write_atomically
from . import protocol
from .demo import bar_checks, judge, run_demo
from .world import World

#: Metrics summarised over the runs, with the direction that is worse.
SUMMARISED: dict[str, str] = {
    "ua": "min",
    "synonym_ua": "min",
    "strict_ua": "min",
    "strict_synonym_ua": "min",
    "ambiguous": "max",
    "ira": "min",
    "cra": "min",
    "masked_fraction": "max",
}


def _run_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    row = {key: metrics["after"][key] for key in SUMMARISED if key in metrics["after"]}
    if "masked_fraction" in metrics:  # a method that masks units (mask, concept-prune)
        row["masked_fraction"] = metrics["masked_fraction"]
    return row


def _erasure_digest(metrics: dict[str, Any]) -> str:
    """What tells two runs' erasures apart: the payload's sha256 the method reports (a mask's, a weight
    edit's), else its recorded cost and settings (an inference-time method has no payload)."""
    for key, value in sorted(metrics.items()):
        if key.endswith("_sha256") and isinstance(value, str):
            return value
    return json.dumps([metrics.get("cost"), metrics.get("erasure")], sort_keys=True, default=str)


def summarise(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean, standard deviation (over runs, ddof 1) and worst value of each metric; runs that meet the bar."""
    rows = {name: _run_metrics(m) for name, m in runs.items()}
    summary: dict[str, Any] = {}
    for key, worse in SUMMARISED.items():
        values = np.array([row[key] for row in rows.values() if key in row], dtype=float)
        if len(values):
            summary[key] = {
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                "worst": float(values.min() if worse == "min" else values.max()),
            }
    bars = {name: {check["metric"]: check["holds"] for check in bar_checks(m)} for name, m in runs.items()}
    summary["runs_meeting_bar"] = sum(all(v.values()) for v in bars.values())
    summary["runs"] = len(runs)
    summary["distinct_erasures"] = len({_erasure_digest(m) for m in runs.values()})
    return {"summary": summary, "bar": bars, "rows": rows}


def run_spread(
    concept: str,
    output: str | Path,
    *,
    seeds: Sequence[int],
    threads: Sequence[int],
    per_group: int = protocol.PER_GROUP,
    anchor: str | None = None,
    overrides: list[str] | None = None,
    world_path: str | Path | None = None,
    progress: bool = True,
    method: str = "mask",
) -> dict[str, Any]:
    """Train the demo recipe once per training seed and thread count and summarise the runs.

    Writes ``output/runs/seed{S}-threads{T}/`` (demo folders), ``output/spread.json`` and
    ``output/spread.md``; returns what ``spread.json`` holds. A run folder that already holds a
    ``metrics.json`` of the same concept, seed and images per group is reused, its images judged
    again (:func:`rejudge`).
    """
    if not seeds or not threads:
        raise ErasekitError("give at least one training seed and one thread count")
    if any(t < 1 for t in threads):
        raise ErasekitError(f"thread counts must be at least 1, got {list(threads)}")
    protocol.check_anchor(concept, anchor)
    folder = Path(output)
    world: World | None = None
    runs: dict[str, dict[str, Any]] = {}
    previous_threads = torch.get_num_threads()
    try:
        for seed in seeds:
            for count in threads:
                name = f"seed{seed}-threads{count}"
                run = folder / "runs" / name
                done = _finished(run, concept, seed, per_group)
                world = world or World.load(world_path)
                if done is not None:
                    runs[name] = rejudge(world, run, done)
                    continue
                torch.set_num_threads(count)
                runs[name] = run_demo(
                    concept,
                    run,
                    world=world,
                    per_group=per_group,
                    anchor=anchor,
                    overrides=[*(overrides or []), f"train.seed={seed}"],
                    progress=progress,
                    overwrite=run.exists(),
                    method=method,
                )
    finally:
        torch.set_num_threads(previous_threads)
    report = {
        "method": method,
        "concept": concept,
        "seeds": list(seeds),
        "threads": list(threads),
        "images_per_group": per_group,
        "overrides": list(overrides or []),
        **summarise(runs),
    }
    report["numerics"] = next(iter(runs.values())).get("numerics")
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / "spread.json", json.dumps(report, indent=2) + "\n")
    write_atomically(folder / "spread.md", format_spread(report))
    return report


def rejudge(world: World, run: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """A finished run's metrics with its saved images judged again by ``world``'s current judges.

    Judging takes seconds where training took minutes, so a spread stays comparable when a judge is
    added or changed; ``metrics.json`` is rewritten when the verdicts changed.
    """
    images = load_file(str(run / "images.safetensors"))
    samples = protocol.evaluation_samples(metrics["concept"], per_group=metrics["images_per_group"])
    updated = dict(metrics)
    for key, name in (("before", "original"), ("after", "erased")):
        updated[key] = judge(world, metrics["concept"], samples, images[name].numpy())
    if updated != metrics:
        write_atomically(run / "metrics.json", json.dumps(updated, indent=2) + "\n")
    return updated


def _finished(run: Path, concept: str, seed: int, per_group: int) -> dict[str, Any] | None:
    try:
        metrics = json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    same = (
        metrics.get("concept") == protocol.resolve_concept(concept)[1]
        and metrics.get("erasure", {}).get("seed") == seed
        and metrics.get("images_per_group") == per_group
    )
    return metrics if same else None


def _percent(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f} %"


def _bar_cell(checks: dict[str, bool]) -> str:
    """The bar column of a run: yes when every check holds, else no and the checks that fail."""
    return "yes" if all(checks.values()) else "no: " + ", ".join(k for k, ok in checks.items() if not ok)


def format_spread(report: dict[str, Any]) -> str:
    """The runs and their summary as a Markdown table."""
    keys = [k for k in SUMMARISED if k in report["summary"]]
    head = "| run | " + " | ".join(keys) + " | meets the bar |\n|" + " --- |" * (len(keys) + 2) + "\n"
    lines = [
        f"| {name} | "
        + " | ".join(_percent(row.get(k, float("nan"))) for k in keys)
        + f" | {_bar_cell(report['bar'][name])} |"
        for name, row in report["rows"].items()
    ]
    summary = report["summary"]
    for stat in ("mean", "std", "worst"):
        lines.append(
            f"| **{stat}** | "
            + " | ".join(
                (f"{100 * summary[k][stat]:.1f}" if stat == "std" else _percent(summary[k][stat])) for k in keys
            )
            + " | |"
        )
    return (
        f"Spread of `{report['method']}` (the demo's recipe) on `{report['concept']}`: "
        f"training seeds {report['seeds']}, threads {report['threads']}, "
        f"{report['images_per_group']} images per group. "
        f"{summary['runs_meeting_bar']} of {summary['runs']} runs meet the bar "
        f"(UA counted strictly); {summary['distinct_erasures']} distinct erasures. Standard deviations in points.\n\n"
        + head
        + "\n".join(lines)
        + "\n"
    )
