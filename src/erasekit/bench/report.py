"""A benchmark's leaderboard: ``leaderboard.json``, ``leaderboard.md`` and ``report.html`` (with plots).

One row per erasure and concept: the protocol's numbers after the erasure (strict UA, UA, strict and
detector synonym UA, IRA, CRA, the judges' disagreement), fidelity of the other prompts' images, what
changed, each attack's rates before and after the attack, and the cost. The original model's numbers
head each concept. What a run measures rather than computes (seconds, peak memory) sits under each
row's ``measured``: everything else is the same whichever processes computed the cells.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from .. import __version__
from ..outputs import write_atomically
from .cells import BenchSettings

LEADERBOARD_FORMAT = "erasekit-bench-leaderboard"
#: The protocol's numbers of a row (:func:`erasekit.toyworld.demo.judge`), with their column titles.
SCORES = {
    "strict_ua": "strict UA",
    "ua": "UA",
    "strict_synonym_ua": "strict syn. UA",
    "synonym_ua": "syn. UA",
    "ira": "IRA",
    "cra": "CRA",
    "ambiguous": "ambiguous",
}
ATTACK_NUMBERS = ("budget", "pre_attack_rate", "post_attack_rate", "new_successes", "attack_success_rate")


def _number(value: Any) -> Any:
    """JSON has no NaN: a missing score (a group without images) is null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def leaderboard(settings: BenchSettings, records: list[dict[str, Any]], world: Any = None) -> dict[str, Any]:
    """The leaderboard of finished cell records (``cell.json``), rows in the settings' order."""
    attacks = {(r["inputs"]["erasure"], r["concept"], r["attack"]): r for r in records if r["kind"] == "attack"}
    original: dict[str, dict[str, Any]] = {}
    rows = []
    for record in (r for r in records if r["kind"] == "erasure"):
        result = record["result"]
        for concept in record["concepts"]:
            row: dict[str, Any] = {
                "method": record["method"],
                "concepts": "+".join(record["concepts"]),
                "concept": concept,
                "cell": record["name"],
                "error": record["error"],
            }
            measured: dict[str, Any] = {}
            if not record["error"]:
                scores = result["scores"][concept]
                original.setdefault(concept, {k: _number(scores["before"].get(k)) for k in SCORES})
                cost = result["cost"]
                row.update(
                    anchor=result["anchor"],
                    scores={k: _number(scores["after"].get(k)) for k in SCORES},
                    fidelity={k: _number(scores["fidelity"][k]) for k in ("psnr", "ssim")},
                    changed=cost["changes"],
                    masked_fraction=result["report"].get("masked_fraction"),
                    cost={
                        k: cost[k]
                        for k in (
                            "parameters_changed",
                            "units_changed",
                            "units_total",
                            "artifact_bytes",
                            "extra_denoiser_calls_per_step",
                        )
                    },
                )
                measured.update(
                    fit_seconds=cost["seconds"],
                    peak_memory_bytes=cost["peak_memory_bytes"],
                    sampling_seconds=cost["sampling_seconds"],
                )
            row["attacks"] = {}
            for name in settings.attacks:
                attack = attacks.get((record["key"], concept, name))
                if attack is None:
                    continue
                if attack["error"]:
                    row["attacks"][name] = {"error": attack["error"]}
                    continue
                row["attacks"][name] = {k: attack["result"][k] for k in ATTACK_NUMBERS}
                measured.setdefault("attack_seconds", {})[name] = attack["result"]["seconds"]
            row["measured"] = measured
            rows.append(row)
    board: dict[str, Any] = {
        "format": LEADERBOARD_FORMAT,
        "format_version": 1,
        "erasekit_version": __version__,
        "settings": settings.record(),
        "original": original,
        "rows": rows,
        "cells": sorted(r["name"] for r in records),
    }
    if world is not None:
        board["world"] = {"name": world.record.get("name"), "sampling": dict(world.sampling)}
    return board


def _percent(value: Any) -> str:
    return "" if value is None else f"{100 * value:.1f} %"


def _bytes(value: Any) -> str:
    if value is None:
        return ""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value} B"


def _attack_cell(numbers: dict[str, Any] | None) -> str:
    if numbers is None:
        return ""
    if "error" in numbers:
        return "failed"
    return f"{_percent(numbers['pre_attack_rate'])} → {_percent(numbers['post_attack_rate'])}"


def _changed(row: dict[str, Any]) -> str:
    if row.get("masked_fraction") is not None:
        return f"{row['masked_fraction']:.2%} of units masked"
    return str(row.get("changed", ""))


def table_rows(board: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The leaderboard as a header and rows of text (the original model's row first for each concept)."""
    attacks = board["settings"]["attacks"]
    header = ["method", "concept", *SCORES.values(), "PSNR / SSIM", "changed"]
    header += [f"{a} (pre → post)" for a in attacks] + ["fit s", "sampling s", "peak memory", "artefact"]
    lines: list[list[str]] = []
    for concept in dict.fromkeys(r["concept"] for r in board["rows"]):
        if concept in board["original"]:
            scores = board["original"][concept]
            lines.append(
                ["original model", concept, *(_percent(scores[k]) for k in SCORES)] + [""] * (6 + len(attacks))
            )
        for row in (r for r in board["rows"] if r["concept"] == concept):
            if row["error"]:
                lines.append([row["method"], row["concepts"], f"failed: {row['error']}"] + [""] * (len(header) - 3))
                continue
            fid = row["fidelity"]
            psnr = "identical" if fid["psnr"] is None else f"{fid['psnr']:.1f}"
            measured = row["measured"]
            lines.append(
                [
                    row["method"],
                    row["concepts"],
                    *(_percent(row["scores"][k]) for k in SCORES),
                    f"{psnr} / {fid['ssim']:.3f}",
                    _changed(row),
                    *(_attack_cell(row["attacks"].get(a)) for a in attacks),
                    f"{measured['fit_seconds']:.1f}",
                    f"{measured['sampling_seconds']:.1f}",
                    _bytes(measured["peak_memory_bytes"]),
                    _bytes(row["cost"]["artifact_bytes"]),
                ]
            )
    return header, lines


def markdown(board: dict[str, Any]) -> str:
    """``leaderboard.md``: what was run, the table, and how to read it."""
    settings = board["settings"]
    header, lines = table_rows(board)
    text = [
        "# erasekit bench: leaderboard",
        "",
        f"ShapesCanvas, {settings['images_per_group']} evaluation images per group; attacks on "
        f"{len(settings['attack_seeds'])} seeds at budget "
        f"{settings['attack_budget'] if settings['attack_budget'] else 'each attack default'}; erasekit "
        f"{board['erasekit_version']}.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---", "---"] + ["---:"] * (len(header) - 2)) + " |",
        *("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines),
        "",
        "Strict UA: concept prompts whose image no judge takes for the concept; UA: the detector alone; "
        "syn.: prompts naming the concept by a synonym; IRA / CRA: the other values of the attribute drawn "
        "correctly / their other attributes correct; ambiguous: the judges disagree. PSNR / SSIM: the other "
        "prompts' images against the original model's. Attacks: the share of seeds where the judge sees the "
        "concept without the attack → with it. Fit seconds, sampling seconds (the erased model drawing the "
        "evaluation images: where inference-time methods pay) and peak memory (of the fit) are one run's "
        "measurements.",
        "",
    ]
    return "\n".join(text)


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def plots(board: dict[str, Any]) -> dict[str, str]:
    """Base64 PNGs: UA against IRA per concept, attack rates per erasure, costs per erasure."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    rows = [r for r in board["rows"] if not r["error"]]
    concepts = list(dict.fromkeys(r["concept"] for r in board["rows"]))
    methods = list(dict.fromkeys(r["method"] for r in board["rows"]))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    images: dict[str, str] = {}

    figure, axes = plt.subplots(1, len(concepts), figsize=(4.2 * len(concepts), 4), squeeze=False)
    for ax, concept in zip(axes[0], concepts):
        for row in (r for r in rows if r["concept"] == concept):
            ira, ua = row["scores"]["ira"], row["scores"]["strict_ua"]
            if ira is None or ua is None:
                continue
            ax.scatter(ira, ua, s=60, color=colours[row["method"]], label=row["method"], zorder=3)
            ax.annotate(row["method"], (ira, ua), textcoords="offset points", xytext=(5, 4), fontsize=8)
        before = board["original"].get(concept)
        if before and before["ira"] is not None:
            ax.scatter(before["ira"], before["strict_ua"], marker="x", s=70, color="black", label="original", zorder=3)
        ax.set(xlim=(-0.03, 1.03), ylim=(-0.03, 1.03), xlabel="IRA (other values kept)", title=concept)
        ax.set_ylabel("strict UA (concept erased)")
        ax.grid(alpha=0.3)
    figure.suptitle("Erasure against retention: top right is best")
    images["scatter"] = _png(figure)
    plt.close(figure)

    attacks = board["settings"]["attacks"]
    labels = [f"{r['method']}\n{r['concept']}" for r in rows]
    figure, axes = plt.subplots(
        1, max(1, len(attacks)), figsize=(max(5, 0.8 * len(rows) + 2) * len(attacks), 3.8), squeeze=False
    )
    for ax, attack in zip(axes[0], attacks):
        pre, post = [], []
        for r in rows:
            numbers = r["attacks"].get(attack) or {}
            # a refused attack (e.g. on an inference-time erasure it cannot reach) gets no bar, not a 0 % one
            pre.append(None if "error" in numbers else numbers.get("pre_attack_rate") or 0.0)
            post.append(None if "error" in numbers else numbers.get("post_attack_rate") or 0.0)
        x = range(len(rows))
        for i, (a, b) in enumerate(zip(pre, post)):
            if a is None or b is None:
                ax.text(i, 0.02, "refused", ha="center", va="bottom", fontsize=7, rotation=90)
                continue
            ax.bar(i - 0.2, a, width=0.4, color="lightgray", label="without the attack" if i == 0 else None)
            ax.bar(i + 0.2, b, width=0.4, color="tab:red", label="with the attack" if i == 0 else None)
            ax.text(i - 0.2, a + 0.01, f"{a:.0%}", ha="center", va="bottom", fontsize=7)
            ax.text(i + 0.2, b + 0.01, f"{b:.0%}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.set(ylim=(0, 1.1), ylabel="seeds showing the concept", title=attack)
        ax.legend(fontsize=8)
    images["attacks"] = _png(figure)
    plt.close(figure)

    figure, axes = plt.subplots(1, 4, figsize=(max(4, 0.7 * len(rows) + 1.5) * 4, 3.8), squeeze=False)
    measures = (
        ("fit seconds", [r["measured"]["fit_seconds"] for r in rows]),
        (
            f"sampling seconds ({3 * board['settings']['images_per_group']} images)",
            [r["measured"]["sampling_seconds"] for r in rows],
        ),
        ("peak memory (MB)", [r["measured"]["peak_memory_bytes"] / 1e6 for r in rows]),
        ("artefact (KB)", [r["cost"]["artifact_bytes"] / 1e3 for r in rows]),
    )
    for ax, (title, values) in zip(axes[0], measures):
        ax.bar(range(len(rows)), values, color=[colours[r["method"]] for r in rows])
        ax.set_xticks(list(range(len(rows))), labels, fontsize=8)
        ax.set_title(title)
    images["cost"] = _png(figure)
    plt.close(figure)
    return images


def report_html(board: dict[str, Any]) -> str:
    """``report.html``: the table and the plots (embedded PNGs), then the whole leaderboard as JSON."""
    header, lines = table_rows(board)
    pictures = plots(board)
    table = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>" for line in lines)
    figure = '<img src="data:image/png;base64,{}" alt="{}">'
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>erasekit bench</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:.3em .6em;text-align:right}} td:nth-child(-n+2){{text-align:left}}
img{{max-width:100%}}</style></head>
<body><h1>erasekit bench</h1>
<p>{html.escape(markdown(board).split(chr(10))[2])}</p>
<table>{table}</table>
<h2>Erasure against retention</h2>{figure.format(pictures["scatter"], "strict UA against IRA")}
<h2>Attacks</h2><p>Share of attack seeds where the judge sees the concept, without and with the attack.</p>
{figure.format(pictures["attacks"], "attack rates")}
<h2>Cost</h2><p>Fit seconds, sampling seconds (the erased model drawing the evaluation images) and peak
memory (of the fit) are one run's measurements on this machine.</p>
{figure.format(pictures["cost"], "cost")}
<h2>All numbers</h2><pre>{html.escape(json.dumps(board, indent=2))}</pre>
</body></html>
"""


def write_reports(
    output: Path, settings: BenchSettings, records: list[dict[str, Any]], world: Any = None
) -> list[Path]:
    """Write ``leaderboard.json``, ``leaderboard.md`` and ``report.html`` into ``output``; returns their paths."""
    board = leaderboard(settings, records, world)
    return [
        write_atomically(output / "leaderboard.json", json.dumps(board, indent=2) + "\n"),
        write_atomically(output / "leaderboard.md", markdown(board)),
        write_atomically(output / "report.html", report_html(board)),
    ]
