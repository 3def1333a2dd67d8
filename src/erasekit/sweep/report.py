"""A sweep's report: ``trials.csv`` (every trial), ``front.md`` (the Pareto front) and ``front.png``.

Each file is written atomically (:func:`erasekit.outputs.write_atomically`), so that a reader, or
another worker writing the same report at the same time, never sees half of one.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from PIL import Image, ImageDraw

from ..outputs import write_atomically


def metric_names(study: optuna.Study) -> list[str]:
    return list(study.metric_names or [f"value{i}" for i in range(len(study.directions))])


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value if isinstance(value, str) else json.dumps(value)


def trials_csv(study: optuna.Study) -> str:
    """One row per trial: number, state, each parameter, each value, seconds, folder, notes."""
    trials = study.get_trials(deepcopy=False)
    names = metric_names(study)
    params = list(dict.fromkeys(key for t in trials for key in t.params))
    extras = sorted({k for t in trials for k in t.user_attrs if k.startswith("extra:")})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "number",
            "state",
            *params,
            *names,
            *(e.split(":", 1)[1] for e in extras),
            "seconds",
            "folder",
            "retried_from",
            "note",
        ]
    )
    for t in trials:
        values = list(t.values) if t.values is not None else [None] * len(names)
        note = "surplus: the study already had its trials" if t.user_attrs.get("surplus") else ""
        if t.state == TrialState.FAIL:
            note = t.user_attrs.get("error") or "no heartbeat: its worker died (killed?); see retried_from"

        writer.writerow(
            [
                t.number,
                t.state.name,
                *(_cell(t.params.get(p)) for p in params),
                *(_cell(v) for v in values),
                *(_cell(t.user_attrs.get(e)) for e in extras),
                _cell(t.user_attrs.get("seconds")),
                t.user_attrs.get("folder", ""),
                _cell(t.system_attrs.get("failed_trial")),
                note,
            ]
        )
    return buffer.getvalue()


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def front_markdown(
    study: optuna.Study,
    front: Sequence[FrozenTrial],
    rescored: Mapping[int, Mapping[str, Any]] | None = None,
    baseline: Mapping[str, Any] | None = None,
) -> str:
    """The Pareto front as a Markdown table, best first by the first value; with ``rescored`` (trial
    number -> metric -> value on another draw) a column per rescored metric, and with ``baseline`` (the
    same metrics of the recipe the sweep started from) a row ``base`` for comparison."""
    names = metric_names(study)
    directions = [d.name.lower() for d in study.directions]
    params = list(dict.fromkeys(key for t in front for key in t.params))
    extra = list(dict.fromkeys(k for scores in (rescored or {}).values() for k in scores))
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    lines = [
        f"# Pareto front of study `{study.study_name}`",
        "",
        f"{len(front)} of {complete} completed trials are on the front "
        f"({', '.join(f'{n}: {d}' for n, d in zip(names, directions))}).",
        "",
    ]
    header = ["trial", *names, *(f"{k} (rescored)" for k in extra), *params]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| " + " | ".join(["---:"] * (1 + len(names) + len(extra)) + ["---"] * len(params)) + " |")
    sign = -1 if directions[0] == "maximize" else 1
    for t in sorted(front, key=lambda t: (sign * t.values[0], t.number)):
        scores = (rescored or {}).get(t.number, {})
        row = [str(t.number), *(_format(v) for v in t.values), *(_format(scores.get(k, "")) for k in extra)]
        row += [_format(t.params.get(p, "")) for p in params]
        lines.append("| " + " | ".join(row) + " |")
    if baseline:
        row = ["base", *("" for _ in names), *(_format(baseline.get(k, "")) for k in extra), *("" for _ in params)]
        lines.append("| " + " | ".join(row) + " |")
    if rescored:
        lines += ["", "(rescored): the same trial's recipe measured again on another draw (the evaluation draw)."]
    return "\n".join(lines) + "\n"


def front_plot(study: optuna.Study, front: Sequence[FrozenTrial], size: int = 480) -> Image.Image:
    """Scatter of the first two values of every completed trial, the front in red and joined by a line.

    Drawn with PIL (matplotlib is not a dependency); axes span the values seen, with ticks at the ends.
    """
    names = metric_names(study)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    points = [(t.values[0], t.values[1] if len(t.values) > 1 else 0.0) for t in done]
    margin, canvas = 60, Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = margin, 20, size - 20, size - margin
    draw.rectangle((left, top, right, bottom), outline="black")
    if not points:
        draw.text((left + 10, top + 10), "no completed trials", fill="black")
        return canvas
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x0, x1 = (x0 - 0.5, x1 + 0.5) if x0 == x1 else (x0, x1)
    y0, y1 = (y0 - 0.5, y1 + 0.5) if y0 == y1 else (y0, y1)

    def at(x: float, y: float) -> tuple[float, float]:
        pad = 8
        return (
            left + pad + (x - x0) / (x1 - x0) * (right - left - 2 * pad),
            bottom - pad - (y - y0) / (y1 - y0) * (bottom - top - 2 * pad),
        )

    for x, y in points:
        px, py = at(x, y)
        draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill="gray")
    best = sorted((t.values[0], t.values[1] if len(t.values) > 1 else 0.0) for t in front)
    if len(best) > 1:
        draw.line([at(x, y) for x, y in best], fill="red", width=2)
    for x, y in best:
        px, py = at(x, y)
        draw.ellipse((px - 5, py - 5, px + 5, py + 5), fill="red", outline="black")
    for value, (px, _) in ((x0, at(x0, y0)), (x1, at(x1, y0))):
        draw.text((px - 12, bottom + 6), f"{value:.3g}", fill="black")
    for value, (_, py) in ((y0, at(x0, y0)), (y1, at(x0, y1))):
        draw.text((left - 45, py - 6), f"{value:.3g}", fill="black")
    draw.text(((left + right) // 2 - 30, bottom + 30), names[0], fill="black")
    draw.text((4, top - 14), names[1] if len(names) > 1 else "", fill="black")
    draw.text((right - 150, top + 6), f"red: Pareto front ({len(front)})", fill="red")
    return canvas


def write_outputs(
    study: optuna.Study,
    output: Path,
    front: Sequence[FrozenTrial],
    rescored: Mapping[int, Mapping[str, Any]] | None = None,
    baseline: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``trials.csv``, ``front.md`` and ``front.png`` into ``output``; returns their paths."""
    buffer = io.BytesIO()
    front_plot(study, front).save(buffer, format="PNG")
    return [
        write_atomically(output / "trials.csv", trials_csv(study)),
        write_atomically(output / "front.md", front_markdown(study, front, rescored, baseline)),
        write_atomically(output / "front.png", buffer.getvalue()),
    ]
