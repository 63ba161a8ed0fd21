"""The one notebook runner `course-lab`, `course-grade` and the build share, in real kernels:
where the kernel starts, which course_lib it imports, and how errors, timeouts and hooks behave."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError, CellTimeoutError

from course_lib.notebook_run import PACKAGE_PARENT, execute_notebook, kernel_env


def code_notebook(*sources, markdown_first=False):
    cells = [nbformat.v4.new_code_cell(s) for s in sources]
    if markdown_first:
        cells.insert(0, nbformat.v4.new_markdown_cell("# a heading"))
    return nbformat.v4.new_notebook(cells=cells)


def stdout_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")


def test_kernel_env_puts_this_course_lib_first_once_and_leaves_ours_alone():
    before = dict(os.environ)
    env = kernel_env({"PYTHONPATH": os.pathsep.join(["/elsewhere", str(PACKAGE_PARENT)]), "KEEP": "1"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(PACKAGE_PARENT), "/elsewhere"]
    assert env["KEEP"] == "1"
    assert kernel_env({})["PYTHONPATH"] == str(PACKAGE_PARENT)
    assert dict(os.environ) == before
    assert (PACKAGE_PARENT / "course_lib" / "notebook_run.py").is_file()


def test_the_kernel_starts_in_the_given_folder_and_imports_this_course_lib(tmp_path):
    nb = code_notebook(
        "import os, course_lib\n"
        "print(os.getcwd())\n"
        "print(os.environ['PYTHONPATH'].split(os.pathsep)[0])\n"
        "print(course_lib.__file__)")
    seen = []
    execute_notebook(nb, tmp_path, cell_timeout=60, on_cell_execute=lambda cell, index: seen.append(index))
    cwd, first_path, module_file = stdout_of(nb.cells[0]).splitlines()
    assert Path(cwd).resolve() == tmp_path.resolve()
    assert first_path == str(PACKAGE_PARENT)
    assert Path(module_file).resolve().parent.parent == PACKAGE_PARENT
    assert seen == [0]
    assert "execution" in nb.cells[0].metadata  # nbclient's timing, kept by default (the build commits it)


def test_by_default_the_first_error_stops_the_run():
    nb = code_notebook("raise ValueError('first')", "print('never')")
    with pytest.raises(CellExecutionError, match="first"):
        execute_notebook(nb, ".", cell_timeout=60)
    assert nb.cells[1].outputs == []


def test_allowing_errors_and_interrupting_timeouts_runs_every_cell():
    nb = code_notebook("raise ValueError('first')", "while True:\n    pass", "print('still ran')",
                       markdown_first=True)
    seen = []
    execute_notebook(nb, ".", cell_timeout=3, allow_errors=True, interrupt_on_timeout=True, record_timing=False,
                     on_cell_execute=lambda cell, index: seen.append(index))
    assert nb.cells[1].outputs[0]["ename"] == "ValueError"
    # The interrupted kernel's own KeyboardInterrupt may arrive before the runner's TimeoutError.
    assert nb.cells[2].outputs[0]["ename"] in ("TimeoutError", "KeyboardInterrupt")
    assert stdout_of(nb.cells[3]) == "still ran\n"
    assert seen == [1, 2, 3]  # code cells only, with their index in the notebook
    assert all("execution" not in cell.metadata for cell in nb.cells)


def test_a_cell_over_its_time_raises_unless_interrupted_and_timeout_for_overrides_the_default():
    nb = code_notebook("import time\ntime.sleep(30)", "print('never')")
    with pytest.raises(CellTimeoutError):
        execute_notebook(nb, ".", cell_timeout=600, timeout_for=lambda cell: 2)
    assert nb.cells[1].outputs == []


@pytest.mark.parametrize("bad", [0, -5, None])
def test_a_cell_timeout_that_is_not_positive_is_refused(bad):
    with pytest.raises(ValueError, match="cell_timeout"):
        execute_notebook(code_notebook("x = 1"), ".", cell_timeout=bad)
