"""``report.html``: the lab run as one page a person opens in a browser.

One section per lesson: its status and time, its headline, the metrics it recorded with `record_metrics`,
its error when it failed (the exception and the traceback the notebook shows), and every figure its
executed notebook drew. The figures are the notebook's own image outputs (``image/png``, ``image/jpeg``,
``image/svg+xml``), embedded as ``data:`` URIs, so the file is self-contained: it can be mailed, attached
to a CI run or opened from another folder. Every text that comes from a notebook (headline, metric
names and values, error messages) is escaped; the image payloads are decoded and re-encoded, so nothing
from a notebook reaches the page as markup.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import re
from pathlib import Path

from .lab import SYLLABUS, NotebookResult

IMAGE_TYPES = ("image/png", "image/jpeg", "image/svg+xml")  # what a browser shows in an <img>, in this order
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # the colour codes in a Jupyter traceback

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 70em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
.status-ok { color: #176b2c; } .status-failed { color: #a4161a; font-weight: bold; }
section { border-top: 2px solid #ddd; margin-top: 2em; }
.metrics code { white-space: pre-wrap; word-break: break-word; }
pre.error { background: #fff0f0; border: 1px solid #e0b0b0; padding: .6em; overflow-x: auto; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 85%; color: #555; }
"""


def notebook_images(nb) -> list[dict]:
    """Every image output of an executed notebook, in cell order: ``{"cell": i, "mime": ..., "base64": ...}``
    (``cell`` counts from 1 over all cells, as Jupyter shows them; one output gives one image, the first of
    :data:`IMAGE_TYPES` it holds). A payload that is not valid base64 is left out."""
    images = []
    for index, cell in enumerate(nb.cells, start=1):
        for output in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            data = output.get("data", {})
            mime = next((m for m in IMAGE_TYPES if m in data), None)
            if mime is None:
                continue
            payload = data[mime]
            payload = "".join(payload) if isinstance(payload, list) else payload
            if mime == "image/svg+xml":  # nbformat keeps SVG as text, the others as base64
                raw = payload.encode()
            else:
                try:
                    raw = base64.b64decode("".join(payload.split()), validate=True)
                except (binascii.Error, ValueError):
                    continue
            images.append({"cell": index, "mime": mime, "base64": base64.b64encode(raw).decode("ascii")})
    return images


def notebook_error(nb) -> str:
    """The traceback of the first error output of an executed notebook, without colour codes ('' if none)."""
    for cell in nb.cells:
        for output in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            if output.get("output_type") == "error":
                text = "\n".join(output.get("traceback", [])) or f"{output.get('ename')}: {output.get('evalue')}"
                return _ANSI.sub("", text)
    return ""


def _format_value(value) -> str:
    """A metric as compact text: floats to 4 significant digits, lists and dicts as JSON."""
    def compact(v):
        if isinstance(v, float):
            return float(f"{v:.4g}")
        if isinstance(v, dict):
            return {str(k): compact(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [compact(x) for x in v]
        return v

    value = compact(value)
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def _lesson_section(result: NotebookResult, nb) -> str:
    e = html.escape
    ok = result.status == "ok"
    title = SYLLABUS.get(result.lesson, "")
    parts = [f'<section id="lesson-{e(result.lesson)}" class="lesson">',
             f'<h2>{e(result.lesson)} · {e(title)}</h2>',
             f'<p><span class="status {"status-ok" if ok else "status-failed"}">{e(result.status)}</span>'
             f' · {result.seconds:.1f} s · <a href="{e(result.notebook)}">{e(result.notebook)}</a> (executed)</p>']
    if result.headline:
        parts.append(f'<p class="headline"><strong>{e(result.headline)}</strong></p>')
    if result.detail:
        parts.append(f'<p class="detail">{e(result.detail)}</p>')
    traceback = notebook_error(nb) if nb is not None and not ok else ""
    if traceback:
        parts.append(f'<pre class="error">{e(traceback)}</pre>')
    if result.metrics:
        rows = "".join(f"<tr><th>{e(str(name))}</th><td><code>{e(_format_value(value))}</code></td></tr>"
                       for name, value in result.metrics.items())
        parts.append(f'<table class="metrics"><tr><th>metric</th><th>value</th></tr>{rows}</table>')
    images = notebook_images(nb) if nb is not None else []
    for number, image in enumerate(images, start=1):
        caption = f"lesson {result.lesson}, figure {number} (cell {image['cell']})"
        parts.append(f'<figure><img src="data:{image["mime"]};base64,{image["base64"]}" alt="{e(caption)}">'
                     f'<figcaption>{e(caption)}</figcaption></figure>')
    if nb is None:
        parts.append("<p>The executed notebook is missing, so its figures cannot be shown.</p>")
    elif not images:
        parts.append("<p>No figures.</p>")
    parts.append("</section>")
    return "\n".join(parts)


def render_report(title: str, results: list[NotebookResult], notebooks: dict[str, object]) -> str:
    """The whole page: a summary table (lesson, status, seconds, headline) then one section per lesson.
    ``notebooks`` maps a result's ``notebook`` name to its executed notebook (nbformat), or None."""
    e = html.escape
    rows = "".join(
        f'<tr><td><a href="#lesson-{e(r.lesson)}">{e(r.lesson)}</a></td>'
        f'<td class="{"status-ok" if r.status == "ok" else "status-failed"}">{e(r.status)}</td>'
        f'<td class="number">{r.seconds:.1f}</td><td>{e(r.headline or r.detail)}</td></tr>'
        for r in results)
    sections = "\n".join(_lesson_section(r, notebooks.get(r.notebook)) for r in results)
    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{e(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{e(title)}</h1>\n"
            f"<table class=\"summary\"><tr><th>lesson</th><th>status</th><th>seconds</th><th>headline</th></tr>"
            f"{rows}</table>\n{sections}\n</body>\n</html>\n")


def executed_notebooks(out_dir: Path, results: list[NotebookResult]) -> dict[str, object]:
    """The executed notebooks the runner wrote beside the report, by name (None where one is missing or
    unreadable: the report still lists that lesson)."""
    import nbformat

    notebooks = {}
    for result in results:
        try:
            notebooks[result.notebook] = nbformat.read(Path(out_dir) / result.notebook, as_version=4)
        except (OSError, ValueError, nbformat.reader.NotJSONError):
            notebooks[result.notebook] = None
    return notebooks
