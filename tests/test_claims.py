"""The claims table: rendered by the lessons, collected from their stored outputs, never typed by hand."""

import json

import pytest

from course_lib import claims


def _notebook(path, *records):
    outputs = [{"output_type": "display_data", "metadata": {},
                "data": {"text/markdown": "x", claims.MIME: r}} for r in records]
    cells = [{"cell_type": "code", "source": "", "metadata": {}, "outputs": outputs, "execution_count": 1}]
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))


def test_claim_validates_and_returns_the_record(capsys):
    record = claims.claim("r = 8 is enough", source="Hu et al. 2021", verdict="holds", evidence="0.21 vs 0.20")
    assert record == {"claim": "r = 8 is enough", "source": "Hu et al. 2021", "verdict": "holds",
                      "evidence": "0.21 vs 0.20"}
    with pytest.raises(ValueError, match="verdict 'true'"):
        claims.claim("a", source="b", verdict="true", evidence="c")
    with pytest.raises(ValueError, match="no '\\|'"):
        claims.claim("a | b", source="b", verdict="open", evidence="c")
    with pytest.raises(ValueError, match="non-empty evidence"):
        claims.claim("a", source="b", verdict="open", evidence=" ")


def test_table_is_collected_in_lesson_order_and_the_readme_check_sees_staleness(tmp_path):
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    _notebook(nbs / "03_lora.ipynb", {"claim": "C3", "source": "S3", "verdict": "corrected", "evidence": "E3"})
    _notebook(nbs / "00_foundations.ipynb", {"claim": "C0", "source": "S0", "verdict": "holds", "evidence": "E0"})
    table = claims.readme_table(nbs)
    assert table.splitlines()[2:] == ["| C0 | S0 | 00 | holds | E0 |", "| C3 | S3 | 03 | corrected | E3 |"]
    readme = tmp_path / "README.md"
    readme.write_text(f"# t\n{claims.README_START}\nold\n{claims.README_END}\nafter\n")
    assert not claims.update_readme(readme, nbs, check=True)
    assert claims.update_readme(readme, nbs)
    assert claims.update_readme(readme, nbs, check=True) and readme.read_text().endswith("after\n")
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        claims.update_readme(readme, nbs)


def test_readme_claims_table_matches_the_committed_notebooks():
    assert claims.update_readme(check=True), "README.md's claims table is stale: run `python -m course_lib.claims`"
