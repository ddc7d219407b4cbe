"""Evaluation reports: JSON (every figure with its provenance), a Markdown table, and an HTML page that shows
the reference images beside the generated ones, prompt by prompt, with their scores."""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import asdict, is_dataclass
from pathlib import Path

from PIL import Image

from ..export import atomic_write
from .metrics import library_versions

LIBRARIES = ("personalize", "torch", "diffusers", "transformers", "peft")


def _plain(value):
    return asdict(value) if is_dataclass(value) else value


def _thumbnail(image: Image.Image, size: int = 128) -> str:
    image = image.copy()
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def write_report(output: str | Path, metrics: list, *, context: dict, references: list[Image.Image] = (),
                 samples: dict[str, list[Image.Image]] | None = None, per_prompt: dict[str, dict[str, float]] | None = None) -> list[Path]:
    """report.json, report.md and report.html in `output`; returns their paths."""
    output = Path(output)
    rows = [_plain(m) for m in metrics]
    payload = {"context": context, "versions": library_versions(LIBRARIES), "metrics": rows, "per_prompt": per_prompt or {}}
    json_file = atomic_write(output / "report.json", lambda t: t.write_text(json.dumps(payload, indent=1, default=str)))

    lines = ["| metric | value | N | convention |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['value']:.4f} | {r.get('n', '')} | {r.get('convention', '')} |")
    md = f"# Evaluation\n\n{json.dumps(context)}\n\n" + "\n".join(lines) + "\n"
    md_file = atomic_write(output / "report.md", lambda t: t.write_text(md))

    parts = [f"<html><head><meta charset='utf-8'><title>personalize evaluation</title>"
             "<style>body{font-family:sans-serif} img{margin:2px} td,th{padding:4px 8px}</style></head><body>",
             "<h1>Evaluation</h1>", f"<pre>{html.escape(json.dumps(context, indent=1))}</pre>", "<table border=1>",
             "<tr><th>metric</th><th>value</th><th>N</th><th>convention</th></tr>"]
    for r in rows:
        parts.append(f"<tr><td>{html.escape(r['name'])}</td><td>{r['value']:.4f}</td><td>{r.get('n', '')}</td>"
                     f"<td>{html.escape(str(r.get('convention', '')))}</td></tr>")
    parts.append("</table>")
    if references:
        parts.append("<h2>Reference images</h2>" + "".join(f"<img src='{_thumbnail(im)}'>" for im in references))
    for prompt, images in (samples or {}).items():
        scores = ", ".join(f"{k} {v:.3f}" for k, v in (per_prompt or {}).get(prompt, {}).items())
        parts.append(f"<h3>{html.escape(prompt)}</h3><p>{html.escape(scores)}</p>")
        parts.append("".join(f"<img src='{_thumbnail(im)}'>" for im in images))
    parts.append("</body></html>")
    html_file = atomic_write(output / "report.html", lambda t: t.write_text("\n".join(parts), encoding="utf-8"))
    return [json_file, md_file, html_file]
