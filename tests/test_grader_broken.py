"""Broken submissions, end to end in real kernels: each kind costs its own exercise alone, with the verdict
the grader must give, within a time bound, while the notebook's other exercises keep their marks.

The submissions are lesson 06's solution notebook (cell ids as in the handout) with some exercise cells
replaced; lesson 06's exercises are pure tensor functions, so a whole notebook grades in seconds."""

import re
from pathlib import Path
import time

import nbformat
import pytest

from course_lib.grading.runner import grade_notebook

from .conftest import ROOT

SOLUTION = ROOT / "solutions" / "06_rlhf_ppo.ipynb"
NAMES = {"06.1": "bradley_terry_loss", "06.2": "sequence_scores", "06.3": "kl_shaped_rewards", "06.4": "gae",
         "06.5": "whiten", "06.6": "policy_loss", "06.7": "value_loss"}
CELL_TIMEOUT = 10


def _solution_cells():
    nb = nbformat.read(SOLUTION, as_version=4)
    cells = {}
    for cell in nb.cells:
        found = re.search(r"### BEGIN SOLUTION (06\.\d)", cell.source)
        if found:
            cells[found.group(1)] = cell.source
    return nb, cells


def _right(exercise_id: str, rename: str | None = None) -> str:
    """The solution's code for one exercise (optionally under another name, to wrap it)."""
    source = _solution_cells()[1][exercise_id]
    return source.replace(f"def {NAMES[exercise_id]}(", f"def {rename}(", 1) if rename else source


def _wrapped(exercise_id: str, body: str) -> str:
    """The solution renamed (`_right` in `body`), and the exercise's function doing `body` around it."""
    name, inner = NAMES[exercise_id], f"_right_{exercise_id.replace('.', '_')}"
    return f"{_right(exercise_id, inner)}\n\ndef {name}(*args, **kwargs):\n{body.replace('_right(', inner + '(')}"


# kind: (exercise, the exercise cell's new source or a callable(nb) that edits the notebook, what the verdict
# must say (None: passes), what the notebook's problems must say)
BROKEN = {
    "a cell that raises before its def": ("06.1", lambda: "raise ValueError('typo')\n" + _right("06.1"),
                                          "is not defined", "ValueError: typo"),
    "os._exit in the exercise cell": ("06.2", lambda: "import os\nos._exit(0)\n" + _right("06.2"),
                                      "is not defined", "kernel died while running cell"),
    "os._exit inside the function": ("06.3", lambda: _wrapped("06.3", "    import os\n    os._exit(0)"),
                                     "kernel died while the check ran your code", None),
    "sys.exit inside the function": ("06.4", lambda: _wrapped("06.4", "    import sys\n    sys.exit(1)"),
                                     "raised SystemExit", None),
    "an endless loop": ("06.5", lambda: _wrapped("06.5", "    while True:\n        pass"), "time limit", None),
    "a recursion bomb": ("06.7", lambda: "def value_loss(*args, **kwargs):\n    return value_loss(*args, **kwargs)",
                         "recursed without end", None),
    "a memory blow-up": ("06.1", lambda: _wrapped("06.1", "    import torch\n    outer = torch.zeros(4096, 4096, 256)  # 16 GiB: a broadcast gone wrong\n"
                                                          "    return _right(*args, **kwargs)"),
                         "ran out of memory", None),
    "a flood of output from a right answer": ("06.2", lambda: _wrapped("06.2", "    print('x' * 2_000_000)\n"
                                                                              "    return _right(*args, **kwargs)"),
                                              None, None),
    "check replaced, wrong answer": ("06.3", lambda: "check = lambda *a, **k: None\n" + _wrapped(
        "06.3", "    return args[1] * 0"), "expected", None),
    "grading forged in sys.modules, wrong answer": ("06.4", lambda: (
        "import sys\ngrading = sys.modules['course_lib.grading']\n"
        "grading.run_exercise = lambda e, o: grading.ExerciseResult(e.id, e.title, True, 'passed')\n"
        "grading.expect = lambda *a, **k: None\n"
        + _wrapped("06.4", "    advantages, returns = _right(*args, **kwargs)\n    return advantages * 2, returns")),
        "expected", None),
    "inputs changed in place": ("06.5", lambda: _wrapped(
        "06.5", "    advantages, mask = args\n    advantages.copy_(_right(advantages, mask))\n    return advantages"),
        "in place", None),
    "the expected answer printed, a wrong one returned": ("06.7", lambda: _wrapped(
        "06.7", "    print('passed', _right(*args, **kwargs))\n    return _right(*args, **kwargs) + 1"), "expected", None),
    "course_lib's reference called": ("06.1", lambda: (
        "from course_lib.reward_model import bradley_terry_loss as _reference\n\n"
        "def bradley_terry_loss(r_chosen, r_rejected, margin):\n    return _reference(r_chosen, r_rejected, margin)"),
        "called course_lib.reward_model.bradley_terry_loss", None),
    "wrong shape": ("06.2", lambda: _wrapped("06.2", "    return _right(*args, **kwargs)[None]"), "", None),
    "wrong dtype (half precision)": ("06.3", lambda: _wrapped("06.3", "    return _right(*args, **kwargs).half()"),
                                     "float16", None),
    "NaN in the answer": ("06.4", lambda: _wrapped(
        "06.4", "    advantages, returns = _right(*args, **kwargs)\n    return advantages * float('nan'), returns"),
        "nan", None),
    "returns None": ("06.5", lambda: _wrapped("06.5", "    _right(*args, **kwargs)"), "", None),
    "returns its input": ("06.6", lambda: "def policy_loss(logp, old_logp, advantages, mask, cliprange):\n    return logp",
                          "", None),
}
EDITS = {  # edits outside the exercise cells: restored from the handout, the right answers keep their marks
    "a check cell and the setup cell edited": "graded as handed out",
}
GROUPS = [  # each notebook breaks different exercises and keeps at least one intact
    ["a cell that raises before its def", "os._exit in the exercise cell", "os._exit inside the function",
     "sys.exit inside the function", "an endless loop", "a recursion bomb"],
    ["a memory blow-up", "a flood of output from a right answer", "check replaced, wrong answer",
     "grading forged in sys.modules, wrong answer", "inputs changed in place", "the expected answer printed, a wrong one returned"],
    ["course_lib's reference called", "wrong shape", "wrong dtype (half precision)", "NaN in the answer", "returns None",
     "returns its input"],
]


def _submission(tmp_path, kinds, edit_outside=False):
    nb, _ = _solution_cells()
    broken = {BROKEN[k][0]: BROKEN[k][1]() for k in kinds}
    for cell in nb.cells:
        found = re.search(r"### BEGIN SOLUTION (06\.\d)", cell.source)
        if found and found.group(1) in broken:
            cell.source = broken[found.group(1)]
        if edit_outside and cell.source.startswith('check("06.6"'):
            cell.source = "print('no need to check')"
        if edit_outside and "torch.manual_seed(0)" in cell.source and "import torch" in cell.source:
            cell.source = cell.source.replace("torch.manual_seed(0)", "torch.manual_seed(1)")
    path = tmp_path / "06_submission.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("group", range(len(GROUPS)))
def test_each_broken_exercise_costs_itself_alone(tmp_path, group):
    kinds = GROUPS[group]
    start = time.monotonic()
    card = grade_notebook(_submission(tmp_path, kinds, edit_outside=group == 2), cell_timeout=CELL_TIMEOUT,
                          memory_gb=3)
    took = time.monotonic() - start
    results = {r.id: r for r in card.results}
    broken_ids = {BROKEN[k][0] for k in kinds}
    for kind in kinds:
        exercise, _, says, problem = BROKEN[kind]
        result = results[exercise]
        if kind == "course_lib's reference called" or says is None:
            assert result.passed, (kind, card.format())
        else:
            assert not result.passed, (kind, card.format())
        if says:
            assert says in result.feedback, (kind, result.feedback)
        if problem:
            assert any(problem in p for p in card.problems), (kind, card.problems)
    for exercise, result in results.items():
        if exercise not in broken_ids:
            assert result.passed, (exercise, card.format())  # the intact exercises keep their marks
    if group == 2:
        assert any(EDITS["a check cell and the setup cell edited"] in p for p in card.problems), card.problems
    # kernel start-ups, re-runs after a dead kernel, two timed-out cells (in-notebook check and recording)
    assert took < 180, f"grading took {took:.0f} s"


def test_at_least_fifteen_kinds_are_covered():
    assert len(BROKEN) + len(EDITS) >= 15 and sorted(sum(GROUPS, [])) == sorted(BROKEN)


@pytest.mark.slow
def test_a_class_batch_writes_a_gradebook_and_one_broken_submission_never_stops_it(tmp_path):
    import csv
    import json
    import shutil
    import subprocess

    folder = tmp_path / "class"
    folder.mkdir()
    shutil.copy(SOLUTION, folder / "06_ada.ipynb")
    shutil.copy(ROOT / "exercises" / "06_rlhf_ppo.ipynb", folder / "06_bob.ipynb")
    (folder / "06_carol.ipynb").write_text("{not a notebook")
    out = subprocess.run(["course-grade", str(folder), "--jobs", "2", "--csv", str(tmp_path / "book.csv"),
                          "--gradebook-json", str(tmp_path / "book.json")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr  # one submission could not be graded
    rows = list(csv.DictReader((tmp_path / "book.csv").open()))
    totals = {Path(r["submission"]).name: r for r in rows if r["exercise"] == "TOTAL"}
    assert totals["06_ada.ipynb"]["points"] == "7" and totals["06_bob.ipynb"]["points"] == "0"
    assert "not a valid notebook" in totals["06_carol.ipynb"]["feedback"]
    assert sum(1 for r in rows if Path(r["submission"]).name == "06_bob.ipynb" and r["exercise"] != "TOTAL") == 7
    assert len(json.loads((tmp_path / "book.json").read_text())["submissions"]) == 3
    assert not list(tmp_path.glob("*.partial"))
