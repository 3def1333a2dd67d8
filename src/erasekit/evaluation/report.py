"""The grid image and the self-contained HTML report of an evaluation."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

#: Prompts shown in the grid and in the report's image table (the tables of numbers cover all).
GRID_ROWS = 8
REPORT_ROWS = 100
#: Longest side of the thumbnails embedded in the report.
THUMBNAIL = 256


def write_grid(rows: Sequence[Sequence[Path]], column_names: Sequence[str], path: Path, cell: int = 128) -> None:
    """One row per job (its first ``GRID_ROWS``), one column per variant, a header with variant names."""
    header = 16
    grid = Image.new("RGB", (cell * len(column_names), header + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(column_names):
        draw.text((c * cell + 4, 2), name[: cell // 7], fill="black")
    for r, paths in enumerate(rows):
        for c, image_path in enumerate(paths):
            with Image.open(image_path) as image:
                grid.paste(image.convert("RGB").resize((cell, cell), Image.BICUBIC), (c * cell, header + r * cell))
    grid.save(path, format="PNG")


def _data_uri(path: Path) -> str:
    with Image.open(path) as image:
        thumb = image.convert("RGB")
        thumb.thumbnail((THUMBNAIL, THUMBNAIL))
        if max(thumb.size) < 96:  # tiny images are blown up (without smoothing) so that they can be seen
            scale = 96 // max(thumb.size) + 1
            thumb = thumb.resize((thumb.width * scale, thumb.height * scale), Image.NEAREST)
        buffer = io.BytesIO()
        thumb.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return html.escape(json.dumps(value, ensure_ascii=False))
    return html.escape("" if value is None else str(value))


def _detector_text(record: dict[str, Any] | None) -> str:
    if not record:
        return ""
    found = "detected" if record.get("detected") else "not detected"
    extra = record.get("classes") or record.get("predicted") or ""
    return f"{found} ({record.get('score', 0):.3g}) {_cell(extra) if extra else ''}"


def write_report(
    summary: dict[str, Any], results: Sequence[dict[str, Any]], variants: Sequence[str], output: Path, path: Path
) -> None:
    """``report.html``: metric table per variant, provenance, and original | erased images per prompt."""
    metric_names = sorted({k for v in summary["metrics"].values() for k in v if not isinstance(v[k], dict)})
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>erasekit evaluation</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:13px}img{display:block}"
        ".prompt{max-width:28em}</style></head><body>",
        f"<h1>erasekit evaluation: {html.escape(summary['prompt_set']['name'])}</h1>",
        f"<p>model <code>{html.escape(summary['model']['id'])}</code>, {summary['prompt_set']['count']} prompts, "
        f"{summary['images_per_variant']} images per variant, "
        f"detector {html.escape(str((summary.get('detector') or {}).get('name')))}</p>",
        "<h2>Metrics</h2><table><tr><th>variant</th>"
        + "".join(f"<th>{html.escape(m)}</th>" for m in metric_names)
        + "</tr>",
    ]
    for name in variants:
        row = summary["metrics"].get(name, {})
        parts.append(
            f"<tr><td>{html.escape(name)}</td>"
            + "".join(f"<td>{_cell(row.get(m))}</td>" for m in metric_names)
            + "</tr>"
        )
    parts.append("</table><h2>Provenance</h2><pre>")
    provenance = {k: v for k, v in summary.items() if k not in ("metrics", "timing")}
    parts.append(html.escape(json.dumps(provenance, indent=2, ensure_ascii=False)))
    parts.append("</pre>")
    by_job: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for record in results:
        by_job.setdefault((record["prompt_index"], record["seed"]), {})[record["variant"]] = record
    shown = list(by_job.items())[:REPORT_ROWS]
    parts.append(f"<h2>Images</h2><p>{len(shown)} of {len(by_job)} prompt/seed pairs.</p><table><tr><th>prompt</th>")
    parts.extend(f"<th>{html.escape(v)}</th>" for v in variants)
    parts.append("</tr>")
    for (index, seed), records in shown:
        first = next(iter(records.values()))
        parts.append(f"<tr><td class='prompt'>#{index}, seed {seed}<br>{html.escape(first['prompt'])}</td>")
        for name in variants:
            record = records.get(name)
            if record is None:
                parts.append("<td></td>")
                continue
            parts.append(
                f"<td><img src='{_data_uri(output / record['image'])}' alt='{html.escape(name)}'>"
                f"{_detector_text(record.get('detector'))}</td>"
            )
        parts.append("</tr>")
    parts.append("</table></body></html>\n")
    path.write_text("".join(parts), encoding="utf-8")
