"""Claims this course puts to the test: stated in a lesson, settled by the lesson's own measurement.

A lesson states a practitioner's claim (a paper's, a well-known article's) and, once it has measured
it, calls :func:`claim` with the verdict and the number that settles it — both computed from the
measurement, never typed in. The cell's output carries the claim twice: as Markdown for the reader
and as JSON (:data:`MIME`) that ``python -m course_lib.claims`` collects from the committed notebooks
into the README's table. The table is therefore rebuilt from the lessons' own outputs and cannot
drift from them: ``tests/test_claims.py`` fails when the README's table is not the one the committed
notebooks give.

    claim("LoRA forgets less than full fine-tuning", source="Biderman et al. 2024",
          verdict="holds" if lora_forgetting < full_forgetting else "corrected",
          evidence=f"forgetting at matched task loss: LoRA {lora_forgetting:+.3f}, full {full_forgetting:+.3f} nats")
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .readme_section import replace_section, section_cli

MIME = "application/vnd.course-lib.claim+json"
VERDICTS = ("holds", "corrected", "open")
README_START, README_END = "<!-- claims:start -->", "<!-- claims:end -->"
ROOT = Path(__file__).resolve().parent.parent


def claim(statement: str, *, source: str, verdict: str, evidence: str) -> dict:
    """Show one settled claim in the notebook and tag it for the README's table.

    ``verdict``: ``"holds"`` (the measurement agrees), ``"corrected"`` (it does not; ``evidence`` says
    what holds instead) or ``"open"`` (this machine cannot settle it, e.g. a GPU-only figure)."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict {verdict!r}: use one of {VERDICTS}")
    for name, value in (("statement", statement), ("source", source), ("evidence", evidence)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"claim needs a non-empty {name} (a string)")
        if "|" in value or "\n" in value:
            raise ValueError(f"claim {name} {value!r}: no '|' or line breaks (it becomes one Markdown table row)")
    record = {"claim": statement, "source": source, "verdict": verdict, "evidence": evidence}
    markdown = f"**Claim** — {statement} ({source}). **Verdict: {verdict}** — {evidence}"
    try:
        from IPython.display import display

        display({"text/markdown": markdown, "text/plain": markdown, MIME: record}, raw=True)
    except ImportError:  # plain Python: still say it
        print(markdown)
    return record


def claims_in(notebook: Path) -> list[dict]:
    """The claims in a notebook's stored outputs, in cell order, each with its ``lesson`` (the file's
    number)."""
    cells = json.loads(Path(notebook).read_text())["cells"]
    lesson = Path(notebook).name[:2]
    found = []
    for cell in cells:
        for output in cell.get("outputs", []):
            record = output.get("data", {}).get(MIME)
            if record is not None:
                found.append({"lesson": lesson, **record})
    return found


def readme_table(notebooks_dir: Path = ROOT / "notebooks") -> str:
    """The README's Markdown table of every claim in the committed lesson notebooks."""
    rows = ["| claim | source | lesson | verdict | the number that settles it |",
            "| --- | --- | --- | --- | --- |"]
    for notebook in sorted(Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb")):
        for c in claims_in(notebook):
            rows.append(f"| {c['claim']} | {c['source']} | {c['lesson']} | {c['verdict']} | {c['evidence']} |")
    return "\n".join(rows)


def update_readme(readme: Path = ROOT / "README.md", notebooks_dir: Path = ROOT / "notebooks",
                  check: bool = False) -> bool:
    """Rewrite the table between the README's markers; with ``check``, only say whether it is current.
    Returns True when the README already had (or now has) the table the notebooks give."""
    return replace_section(readme, README_START, README_END, readme_table(notebooks_dir), check=check)


def main(argv: list[str] | None = None) -> int:
    return section_cli(argv, prog="python -m course_lib.claims",
                       table="claims table", source="the notebooks' outputs",
                       update_readme=update_readme)

if __name__ == "__main__":
    sys.exit(main())
