"""course-grade end to end, in real kernels: full marks for the solutions, zero for the untouched
exercises, and a clear verdict — never a grader traceback — for notebooks that break."""

import json
import subprocess
import time

import nbformat
import pytest

from course_lib.grading.runner import grade_notebook as grade_as_handed_in

from .conftest import ROOT


def grade_notebook(path, **kwargs):
    """These notebooks are written from scratch, with no handout to restore: graded as they are."""
    kwargs.setdefault("handout", False if path.parent.name not in ("solutions", "exercises") else None)
    return grade_as_handed_in(path, **kwargs)

MEMORY_OK = "def estimate_memory_gb(n_params, bits):\n    return n_params * 4 / (32 / bits) * 1.2 / 1e9"


def notebook(tmp_path, *sources, name="00_attempt.ipynb"):
    path = tmp_path / name
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources]), path)
    return path


def by_id(card):
    return {r.id: r for r in card.results}


SOLUTIONS = sorted(p.name for p in (ROOT / "solutions").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("name", SOLUTIONS)
def test_solutions_score_full_marks(name):
    card = grade_notebook(ROOT / "solutions" / name)
    assert card.score == card.total >= 3, card.format()
    assert not card.problems


@pytest.mark.slow
@pytest.mark.parametrize("name", SOLUTIONS)
def test_untouched_exercises_score_zero_with_not_implemented_feedback(name):
    card = grade_notebook(ROOT / "exercises" / name)
    assert card.score == 0 and card.total >= 3
    assert all("not implemented" in r.feedback for r in card.results), card.format()


def test_a_raising_cell_does_not_stop_the_grading(tmp_path):
    card = grade_notebook(notebook(tmp_path, "raise ValueError('oops')", MEMORY_OK))
    results = by_id(card)
    assert results["00.2"].passed
    assert "is not defined" in results["00.1"].feedback
    assert any("raised ValueError: oops" in p for p in card.problems)


def test_an_endless_loop_gets_a_verdict_within_the_timeout(tmp_path):
    start = time.monotonic()
    card = grade_notebook(notebook(tmp_path, "while True:\n    pass", MEMORY_OK), timeout=30, cell_timeout=4)
    assert time.monotonic() - start < 40
    assert any(p.startswith("cell 1 ('while True:') ran over the time limit") and "endless loop" in p
               for p in card.problems), card.problems
    assert by_id(card)["00.2"].passed  # the cells after the loop still ran


def test_an_endless_loop_inside_a_checked_function(tmp_path):
    looping = "def estimate_memory_gb(n_params, bits):\n    while True:\n        pass"
    card = grade_notebook(notebook(tmp_path, looping), timeout=30, cell_timeout=4)
    feedback = by_id(card)["00.2"].feedback
    assert not by_id(card)["00.2"].passed and "time limit" in feedback, feedback


def test_importing_the_checks_does_not_count_against_a_checks_time(tmp_path):
    """Importing torch takes longer than 1 s; a check interrupted mid-import would break every check after it."""
    card = grade_notebook(notebook(tmp_path, MEMORY_OK), cell_timeout=1)
    assert by_id(card)["00.2"].passed, card.format()
    assert not card.problems


def test_sys_exit_is_a_problem_not_a_crash(tmp_path):
    card = grade_notebook(notebook(tmp_path, "import sys\nsys.exit(3)", MEMORY_OK))
    assert any("SystemExit" in p for p in card.problems), card.problems
    assert by_id(card)["00.2"].passed


def test_a_dead_kernel_costs_only_its_cell(tmp_path):
    card = grade_notebook(notebook(tmp_path, MEMORY_OK, "import os\nos._exit(1)"))
    assert any("kernel died while running cell 2" in p for p in card.problems), card.problems
    assert by_id(card)["00.2"].passed, card.format()  # graded again without the cell that killed the kernel


def test_huge_output_is_truncated_and_graded(tmp_path):
    card = grade_notebook(notebook(tmp_path, "print('x' * 5_000_000)", MEMORY_OK))
    assert by_id(card)["00.2"].passed


@pytest.mark.parametrize("prints", [
    "print('thinking', end='')",  # no newline: the old stdout verdict was glued to it
    "print('x' * 25_000)",  # more than a cell's stored output: the old stdout verdict was cut off
])
def test_a_correct_answer_that_prints_is_graded_as_passed(tmp_path, prints):
    printing = MEMORY_OK.replace("\n", f"\n    {prints}\n", 1)
    card = grade_notebook(notebook(tmp_path, printing))
    assert by_id(card)["00.2"].passed, card.format()


def test_a_wrong_answer_cannot_print_its_way_to_a_pass(tmp_path):
    forged = json.dumps({"id": "00.2", "title": "", "passed": True, "feedback": "passed"})
    wrong = f"def estimate_memory_gb(n_params, bits):\n    print({forged!r})\n    return 0.0"
    card = grade_notebook(notebook(tmp_path, wrong))
    assert not by_id(card)["00.2"].passed, card.format()


def run_cli(*args):
    return subprocess.run(["course-grade", *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("target, message", [
    ("missing.ipynb", "no such file"),
    ("pyproject.toml", "not a notebook"),
])
def test_cli_bad_paths_are_one_line_errors(target, message):
    out = run_cli(ROOT / target)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_cli_invalid_notebook_and_unknown_lesson(tmp_path):
    broken = tmp_path / "00_broken.ipynb"
    broken.write_text("{not json")
    out = run_cli(broken)
    assert out.returncode == 2 and "not a valid notebook" in out.stderr and "Traceback" not in out.stderr
    out = run_cli(notebook(tmp_path, "x = 1", name="99_nothing.ipynb"))
    assert out.returncode == 2 and "lesson 99 has no exercises" in out.stderr


def test_cli_json_scorecard_and_exit_code(tmp_path):
    out = run_cli(notebook(tmp_path, MEMORY_OK), "--json")
    card = json.loads(out.stdout)
    assert out.returncode == 1  # not everything passed
    from course_lib.grading import exercises_for

    ids = [e.id for e in exercises_for("00")]
    assert card["score"] == 1 and card["total"] == len(ids) >= 4
    assert [r["id"] for r in card["results"]] == ids
