"""report.html, rendered from synthetic lab results and executed notebooks, read back with the stdlib's
``html.parser`` and, where one is installed, opened in a headless browser.

The parser checks what a browser is given: every lesson's section, every image as a ``data:`` URI whose
bytes are the notebook's own image, and no markup injected by notebook text. The browser test shows the
page as a person sees it: Chromium's own DOM of the page, and a screenshot in which every image is drawn.
It runs where a Chromium binary is on PATH — Debian's ``apt-get install chromium-headless-shell`` — and is
skipped elsewhere, saying so: the Python environment has neither playwright nor selenium, and playwright's
pip package fetches its browser builds from its own download host at install time, which the project's
machines cannot reach; Debian's package is the browser they can install.
"""

import base64
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser

import nbformat
import pytest

from course_lib.lab import NotebookResult
from course_lib.lab_report import notebook_images, render_report


def tiny_png(rgb: tuple[int, int, int] = (255, 0, 0), size: int = 1) -> bytes:
    """A valid ``size``×``size`` PNG of one colour (signature, IHDR, IDAT, IEND), built with the stdlib."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)  # width, height, 8-bit, RGB, no interlace
    rows = (b"\x00" + bytes(rgb) * size) * size  # each row: filter type 0, then its pixels
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
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


BROWSERS = ("chromium-headless-shell", "chromium", "chrome-headless-shell", "google-chrome", "chrome")


def _browser() -> str:
    found = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if found is None:
        pytest.skip(f"no headless browser on PATH ({', '.join(BROWSERS)}): `apt-get install chromium-headless-shell`; "
                    f"the parser tests above still check the page")
    return found


def test_a_browser_shows_every_lesson_and_draws_every_image(tmp_path):
    """Chromium opens the page from disk: its DOM has every section and image and no injected script,
    and its screenshot shows each of the four images, each a square of its own colour, drawn in full."""
    import numpy as np
    from PIL import Image

    colours = {"00": [(250, 20, 180), (20, 200, 240)], "03": [(240, 230, 10)], "04": [(90, 10, 200)]}
    notebooks = {f"{lesson}_demo.ipynb": _notebook(*[[_image_output("image/png", base64.b64encode(
        tiny_png(rgb, size=40)).decode())] for rgb in rgbs]) for lesson, rgbs in colours.items()}
    results = [NotebookResult("00", "00_demo.ipynb", "ok", 1.0, headline="<script>document.body.remove()</script>"),
               NotebookResult("03", "03_demo.ipynb", "ok", 1.0, metrics={"loss": 0.5}),
               NotebookResult("04", "04_demo.ipynb", "error", 1.0, detail="RuntimeError: boom")]
    report = tmp_path / "report.html"
    report.write_text(render_report("course-lab", results, notebooks))
    browser = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*browser, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = Page()
    page.feed(dom.stdout)
    assert page.sections == ["lesson-00", "lesson-03", "lesson-04"] and "script" not in page.tags
    assert [len(page.images[f"lesson-{lesson}"]) for lesson in colours] == [2, 1, 1]
    shot = tmp_path / "shot.png"
    run = subprocess.run([*browser, f"--screenshot={shot}", "--window-size=800,2000", report.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)  # (H, W, 3)
    for lesson, rgbs in colours.items():
        for rgb in rgbs:  # every pixel of a 40×40 image, drawn at its size (a tolerance for colour management)
            drawn = int((np.abs(pixels - np.array(rgb)) <= 3).all(axis=-1).sum())
            assert drawn >= 40 * 40, f"lesson {lesson}: image {rgb} drawn on {drawn} pixels"
