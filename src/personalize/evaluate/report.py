"""Evaluation reports: JSON (every figure with its provenance and the origin of its convention: the paper's words,
our choice where the paper is silent, a user's flag), a Markdown table, and an HTML page that shows the reference
images beside the generated ones, prompt by prompt, with their scores."""

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
_CSS = ("body{font-family:sans-serif;margin:1.5rem;max-width:75rem} td,th{padding:4px 8px;text-align:left;vertical-align:top}"
        " table.settings th{color:#555;font-weight:normal;white-space:nowrap} .images{display:flex;flex-wrap:wrap;gap:6px}"
        " figure{margin:0;width:min-content} figcaption{font-size:11px;color:#444} .scores{color:#333;font-weight:bold}")


def _plain(value):
    return asdict(value) if is_dataclass(value) else value


def stated_by(origin: dict) -> str:
    """Who a figure's rule comes from, in a few words: its paper, our choice where the paper is silent, and/or a
    flag the user gave (MetricResult.origin)."""
    words = {"paper": "paper", "ours": "our choice", "user": "your flag"}
    return " + ".join(words[k] for k in words if origin.get(k)) or "-"


def _thumbnail(image: Image.Image, size: int = 256) -> str:
    image = image.copy()
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


SHOWN_SIDE = 128  # px on the page: the toy model's 32-64 px images are enlarged, sharp, to a size a person can read


def _image(image: Image.Image, note: str = "") -> str:
    """One image at a readable size (small ones enlarged by the browser without smoothing), its note under it."""
    width = max(SHOWN_SIDE, min(image.width, 256))
    tag = f"<img src='{_thumbnail(image)}' width='{width}' style='image-rendering:pixelated'>"
    return f"<figure>{tag}<figcaption>{html.escape(note)}</figcaption></figure>" if note else f"<figure>{tag}</figure>"


def _value(value) -> str:
    """A setting as readable HTML: mappings and lists one entry per line."""
    if isinstance(value, dict):
        return "<br>".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return "<br>".join(html.escape(str(v)) for v in value) or "-"
    return "-" if value is None else html.escape(str(value))


def _settings_table(context: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k).replace('_', ' '))}</th><td>{_value(v)}</td></tr>" for k, v in context.items())
    return f"<table class='settings'>{rows}</table>"


def _toy_reading(reading: dict) -> str:
    """A toy-judge reading in words: what the judge sees in the image."""
    def thing(t):
        return " ".join(str(t[k]) for k in ("size", "colour", "pattern", "shape") if t.get(k))

    if reading.get("objects") == "two":
        return f"{thing(reading['left'])} | {thing(reading['right'])} on {reading['background']}"
    return f"{thing(reading)} ({reading.get('position')}) on {reading['background']}"


def toy_notes(samples: dict[str, list[Image.Image]]) -> dict[str, list[str]]:
    """The toy judge's reading of every sample (the toy protocol's images), for the page."""
    from ..toyworld.judge import ToyJudge

    judge = ToyJudge.load()
    return {prompt: ["judge: " + _toy_reading(r) for r in judge.predict(images)] if images else []
            for prompt, images in samples.items()}


def write_report(output: str | Path, metrics: list, *, context: dict, references: list[Image.Image] = (),
                 samples: dict[str, list[Image.Image]] | None = None, per_prompt: dict[str, dict[str, float]] | None = None,
                 sample_notes: dict[str, list[str]] | None = None) -> list[Path]:
    """report.json, report.md and report.html in `output`; returns their paths. `sample_notes[prompt][i]` is shown
    under sample i of a prompt (a judge's reading, a score); the toy protocol's default is the toy judge's reading."""
    output = Path(output)
    rows = [_plain(m) for m in metrics]
    payload = {"context": context, "versions": library_versions(LIBRARIES), "metrics": rows, "per_prompt": per_prompt or {}}
    json_file = atomic_write(output / "report.json", lambda t: t.write_text(json.dumps(payload, indent=1, default=str)))

    lines = ["| metric | value | N | convention | from |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['value']:.4f} | {r.get('n', '')} | {r.get('convention', '')} | "
                     f"{stated_by(r.get('origin', {}))} |")
    md = f"# Evaluation\n\n{json.dumps(context)}\n\n" + "\n".join(lines) + "\n"
    md_file = atomic_write(output / "report.md", lambda t: t.write_text(md))

    if sample_notes is None and context.get("protocol") == "toy" and samples:
        sample_notes = toy_notes(samples)
    parts = [f"<html><head><meta charset='utf-8'><title>personalize evaluation</title><style>{_CSS}</style></head><body>",
             "<h1>Evaluation</h1>", "<h2>Settings</h2>", _settings_table(context), "<h2>Scores</h2>", "<table border=1>",
             "<tr><th>metric</th><th>value</th><th>N</th><th>convention</th><th>from</th></tr>"]
    for r in rows:
        parts.append(f"<tr><td>{html.escape(r['name'])}</td><td>{r['value']:.4f}</td><td>{r.get('n', '')}</td>"
                     f"<td>{html.escape(str(r.get('convention', '')))}</td>"
                     f"<td>{html.escape(stated_by(r.get('origin', {})))}</td></tr>")
    parts.append("</table>")
    if references:
        parts.append("<h2>Reference images</h2><div class='images'>" + "".join(_image(im) for im in references) + "</div>")
    for prompt, images in (samples or {}).items():
        scores = ", ".join(f"{k} {v:.3f}" for k, v in (per_prompt or {}).get(prompt, {}).items())
        notes = (sample_notes or {}).get(prompt) or [""] * len(images)
        parts.append(f"<h3>{html.escape(prompt)}</h3><p class='scores'>{html.escape(scores)}</p>")
        parts.append("<div class='images'>" + "".join(_image(im, n) for im, n in zip(images, notes)) + "</div>")
    parts.append("</body></html>")
    html_file = atomic_write(output / "report.html", lambda t: t.write_text("\n".join(parts), encoding="utf-8"))
    return [json_file, md_file, html_file]
