import shutil
import subprocess
import sys

import nbformat
import pytest

from course_lib.build import BuildError, build, build_notebook, strip_solutions

from .conftest import ROOT


def test_strip_keeps_indentation_and_names_the_exercise():
    source = "def f(x):\n    ### BEGIN SOLUTION 00.9\n    return x + 1\n    ### END SOLUTION\n\nprint(1)\n"
    assert strip_solutions(source, "nb") == (
        'def f(x):\n    raise NotImplementedError("Exercise 00.9: replace this line with your code")\n\nprint(1)\n')


@pytest.mark.parametrize("source, message", [
    ("### BEGIN SOLUTION\nx = 1\n", "never closed"),
    ("x = 1\n### END SOLUTION\n", "END SOLUTION without a BEGIN"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n", "inside another"),
])
def test_unbalanced_markers_are_errors(source, message):
    with pytest.raises(BuildError, match=message):
        strip_solutions(source, "nb")


def test_committed_exercises_are_up_to_date():
    assert build(ROOT, check=True) == []


def test_generated_exercises_hold_no_solution_and_no_output():
    for solution in sorted((ROOT / "solutions").glob("*.ipynb")):
        nb = nbformat.reads(build_notebook(solution), as_version=4)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "BEGIN SOLUTION" not in code and "NotImplementedError" in code
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
        assert nb.metadata["course"]["lesson"] == solution.name[:2]


def test_check_fails_when_a_solution_changes(tmp_path):
    for folder in ("solutions", "exercises"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    cmd = [sys.executable, "-m", "course_lib.build", "--check", "--root", str(tmp_path)]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    solution = sorted((tmp_path / "solutions").glob("*.ipynb"))[0]
    nb = nbformat.read(solution, as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell("A new explanation."))
    nbformat.write(nb, solution)
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 1 and f"exercises/ is stale: {solution.name}" in out.stderr
    subprocess.run(cmd[:-3] + ["--root", str(tmp_path)], check=True, capture_output=True)  # rebuild
    assert subprocess.run(cmd, capture_output=True).returncode == 0


def test_execute_in_place_saves_fresh_outputs_run_in_the_notebooks_folder(tmp_path, capsys):
    from course_lib.build import execute_in_place

    path = tmp_path / "00_demo.ipynb"
    cell = nbformat.v4.new_code_cell("import os\nprint(os.path.basename(os.getcwd()))")
    cell.outputs = [nbformat.v4.new_output("stream", text="an output from an earlier run\n")]
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), path)
    execute_in_place([path], cell_timeout=60)
    executed = nbformat.read(path, as_version=4)
    assert [o["text"] for o in executed.cells[0].outputs] == [f"{tmp_path.name}\n"]
    assert executed.cells[0].execution_count == 1
    assert f"executed {path}" in capsys.readouterr().out


def test_every_notebook_imports_course_lib_before_the_libraries_that_load_bitsandbytes():
    """Importing peft / trl / transformers loads bitsandbytes, which on AVX-512 BF16 CPUs logs a notice
    about an optional Hub kernel it cannot fetch offline; ``import course_lib`` installs the filter that
    drops it (tests/test_lab.py checks the filter), so it has to come first in every notebook."""
    import re

    third_party = re.compile(r"\s*(import|from) (peft|trl|transformers|bitsandbytes|datasets)\b")
    ours = re.compile(r"\s*(import|from) course_lib\b")
    checked = 0
    for folder in ("notebooks", "solutions", "exercises"):
        for path in sorted((ROOT / folder).glob("*.ipynb")):
            lines = [line for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"
                     for line in cell.source.splitlines()]
            first_ours = next((i for i, line in enumerate(lines) if ours.match(line)), None)
            first_theirs = next((i for i, line in enumerate(lines) if third_party.match(line)), None)
            assert first_ours is not None, f"{folder}/{path.name} never imports course_lib"
            assert first_theirs is None or first_ours < first_theirs, \
                f"{folder}/{path.name}: line {first_theirs} imports a library that loads bitsandbytes before course_lib"
            checked += 1
    assert checked >= 28  # 10 lessons, 9 solutions, 9 exercise notebooks
