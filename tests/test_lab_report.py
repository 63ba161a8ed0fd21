"""report.html, rendered from synthetic lab results and executed notebooks, read back with the stdlib's
``html.parser``.

Parsed, not opened in a headless browser: none is available to the test suite. This machine has no
browser binary (no chromium / chrome / firefox on PATH or among the installed Debian packages) and the
Python environment has neither playwright nor selenium; playwright's pip package fetches its browser
builds from its own download host at install time, which the project's machines cannot reach, and a
Debian chromium is not part of the project's install. The parser checks what a browser would be given:
every lesson's section, every image as a ``data:`` URI whose bytes are the notebook's own image, and
no markup injected by notebook text.
"""

import base64
import struct
import zlib
from html.parser import HTMLParser

import nbformat

from course_lib.lab import NotebookResult
from course_lib.lab_report import notebook_images, render_report


def tiny_png(rgb: tuple[int, int, int] = (255, 0, 0)) -> bytes:
    """A valid 1×1 PNG of one colour (signature, IHDR, IDAT, IEND), built with the stdlib."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # width, height, 8-bit, RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" + bytes(rgb)))
            + chunk(b"IEND", b""))


SVG = '<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"><rect width="4" height="4"/></svg>'


def _image_output(mime: str, payload: str):
    return nbformat.v4.new_output("display_data", data={mime: payload, "text/plain": "<Figure>"})


def _notebook(*cells_outputs):
    """An executed notebook: one code cell per list of outputs, after a markdown cell."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# a lesson")])
    for outputs in cells_outputs:
        cell = nbformat.v4.new_code_cell("plot()")
        cell.outputs = list(outputs)
        nb.cells.append(cell)
    return nb


class Page(HTMLParser):
    """What a browser would build from the page: every start tag, the lesson sections, the images in each
    (src and alt), and the text of each section."""

    def __init__(self):
        super().__init__()
        self.tags, self.sections, self.images, self.text = [], [], {}, {}
        self.section = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self.section = attrs["id"]
            self.sections.append(self.section)
            self.images[self.section], self.text[self.section] = [], ""
        elif tag == "img":
            self.images[self.section].append((attrs["src"], attrs["alt"]))

    def handle_endtag(self, tag):
        if tag == "section":
            self.section = None

    def handle_data(self, data):
        if self.section is not None:
            self.text[self.section] += data


def _synthetic_run():
    red, blue, green = (base64.b64encode(tiny_png(c)).decode() for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0)))
    notebooks = {
        # two figures in one cell (e.g. plt.show() twice), a third in a later cell, one SVG
        "00_foundations.ipynb": _notebook([_image_output("image/png", red), _image_output("image/png", blue)],
                                          [nbformat.v4.new_output("stream", text="loss 1.2\n")],
                                          [_image_output("image/svg+xml", SVG)]),
        "03_lora.ipynb": _notebook([_image_output("image/png", green[:40] + "\n" + green[40:])]),  # base64 with a newline
        "04_nf4_qlora.ipynb": _notebook(
            [_image_output("image/png", red)],
            [nbformat.v4.new_output("error", ename="RuntimeError", evalue="out of memory",
                                    traceback=["\x1b[0;31mRuntimeError\x1b[0m: out of memory", "  at cell 2"])]),
    }
    results = [
        NotebookResult("00", "00_foundations.ipynb", "ok", 12.34, headline="full FT: acc 40% → 90%",
                       metrics={"accuracy": [0.4, 0.912345678], "forgetting": {"full": 0.25}}),
        NotebookResult("03", "03_lora.ipynb", "ok", 5.0, headline="<script>alert('lesson 03')</script> & <b>bold</b>",
                       metrics={"<img src=x onerror=alert(1)>": "</td></table><script>alert(2)</script>"}),
        NotebookResult("04", "04_nf4_qlora.ipynb", "error", 3.0, detail="RuntimeError: out of memory"),
        NotebookResult("05", "05_instruction_tuning.ipynb", "kernel died", 1.0, detail="Kernel died"),
    ]
    notebooks["05_instruction_tuning.ipynb"] = None  # its executed notebook could not be read
    return results, notebooks, {"red": red, "blue": blue, "green": green}


def test_every_lesson_and_every_image_is_on_the_page():
    results, notebooks, png = _synthetic_run()
    page = Page()
    page.feed(render_report("course-lab · profile cpu", results, notebooks))
    assert page.sections == ["lesson-00", "lesson-03", "lesson-04", "lesson-05"]
    sources = {lesson: [src for src, _ in images] for lesson, images in page.images.items()}
    svg = base64.b64encode(SVG.encode()).decode()
    assert sources == {"lesson-00": [f"data:image/png;base64,{png['red']}", f"data:image/png;base64,{png['blue']}",
                                     f"data:image/svg+xml;base64,{svg}"],
                       "lesson-03": [f"data:image/png;base64,{png['green']}"],
                       "lesson-04": [f"data:image/png;base64,{png['red']}"],
                       "lesson-05": []}
    for src, alt in page.images["lesson-00"][:2]:  # the bytes a browser decodes are the notebook's PNG
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    assert [alt for _, alt in page.images["lesson-00"]] == [
        "lesson 00, figure 1 (cell 2)", "lesson 00, figure 2 (cell 2)", "lesson 00, figure 3 (cell 4)"]
    assert "12.3 s" in page.text["lesson-00"] and "full FT: acc 40% → 90%" in page.text["lesson-00"]
    assert '[0.4, 0.9123]' in page.text["lesson-00"] and '{"full": 0.25}' in page.text["lesson-00"]
    assert "executed notebook is missing" in page.text["lesson-05"] and "Kernel died" in page.text["lesson-05"]


def test_notebook_text_is_escaped_not_injected():
    """A headline or metric holding markup shows as text: no script, no extra image, no broken table."""
    results, notebooks, _ = _synthetic_run()
    page = Page()
    page.feed(render_report("<script>title</script>", results, notebooks))
    assert "script" not in page.tags and page.tags.count("img") == 5  # only the notebooks' five images
    assert "<script>alert('lesson 03')</script> & <b>bold</b>" in page.text["lesson-03"]
    assert "<img src=x onerror=alert(1)>" in page.text["lesson-03"]
    assert "</td></table><script>alert(2)</script>" in page.text["lesson-03"]


def test_a_failed_lesson_shows_its_error_and_traceback():
    results, notebooks, _ = _synthetic_run()
    page = Page()
    page.feed(render_report("course-lab", results, notebooks))
    text = page.text["lesson-04"]
    assert "error" in text and "RuntimeError: out of memory" in text and "at cell 2" in text
    assert "\x1b[" not in text  # the terminal colour codes are stripped


def test_an_output_that_is_not_an_image_or_not_base64_is_left_out():
    nb = _notebook([nbformat.v4.new_output("display_data", data={"text/html": "<p>table</p>"}),
                    _image_output("image/png", "not base64 at all!"),
                    _image_output("image/jpeg", base64.b64encode(b"\xff\xd8\xff jpeg").decode())])
    assert [(image["cell"], image["mime"]) for image in notebook_images(nb)] == [(2, "image/jpeg")]
