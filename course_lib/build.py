"""Generate ``exercises/`` from ``solutions/``: ``python -m course_lib.build [--check]``.

In a solution notebook, the code a learner must write sits between ``### BEGIN SOLUTION`` and
``### END SOLUTION`` (nbgrader's markers; an exercise id may follow: ``### BEGIN SOLUTION 00.1``).
The build replaces each region with ``raise NotImplementedError("Exercise 00.1: …")`` at the
region's indentation, clears every output, and records the lesson in the notebook's metadata.
``--check`` regenerates in memory and fails, naming the files, when ``exercises/`` is stale;
``--execute`` first re-runs the lesson and solution notebooks in place, refreshing their outputs.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN = re.compile(r"^(\s*)### BEGIN SOLUTION\b\s*(\S*)")
END = re.compile(r"^\s*### END SOLUTION\b")


GRADING_NOTE = (
    "> **How this notebook is graded.** `check(...)` under each exercise gives instant feedback here; it is not "
    "the grade. The grade comes from `course-grade` on this file: it reruns the notebook in a fresh kernel — your "
    "exercise cells and any cells you add, every other cell as handed out — records what your functions return "
    "on its own inputs, and judges those answers in a separate process that never runs your code.")


class BuildError(ValueError):
    pass


def strip_solutions(source: str, where: str) -> str:
    """Replace each solution region of one cell's source with a NotImplementedError line."""
    out, inside = [], None
    for number, line in enumerate(source.splitlines(keepends=True), 1):
        begin, end = BEGIN.match(line), END.match(line)
        if begin:
            if inside is not None:
                raise BuildError(f"{where}, line {number}: BEGIN SOLUTION inside another solution region")
            indent, exercise_id = begin.groups()
            inside = number
            label = f"Exercise {exercise_id}" if exercise_id else "Exercise"
            out.append(f'{indent}raise NotImplementedError("{label}: replace this line with your code")\n')
        elif end:
            if inside is None:
                raise BuildError(f"{where}, line {number}: END SOLUTION without a BEGIN SOLUTION")
            inside = None
        elif inside is None:
            out.append(line)
    if inside is not None:
        raise BuildError(f"{where}, line {inside}: BEGIN SOLUTION is never closed by ### END SOLUTION")
    return "".join(out)


def clear_outputs(nb) -> None:
    """Remove every code cell's outputs, execution count and timing metadata."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)


def build_notebook(solution_path: Path) -> str:
    """The exercise notebook generated from one solution notebook, as the text to write."""
    import nbformat

    nb = nbformat.read(solution_path, as_version=4)
    regions = 0
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        regions += sum(1 for line in cell.source.splitlines() if BEGIN.match(line))
        cell.source = strip_solutions(cell.source, f"{solution_path.name}, cell {index + 1}").rstrip("\n")
    clear_outputs(nb)
    first = next((cell for cell in nb.cells if cell.cell_type == "markdown"), None)
    if first is not None and GRADING_NOTE not in first.source:
        first.source = first.source.rstrip("\n") + "\n\n" + GRADING_NOTE
    if regions == 0:
        raise BuildError(f"{solution_path.name}: no ### BEGIN SOLUTION region, so there is no exercise to generate")
    nb.metadata["course"] = {"lesson": solution_path.name[:2], "generated_from": f"solutions/{solution_path.name}"}
    return nbformat.writes(nb) + "\n"


def build(root: Path = ROOT, check: bool = False) -> list[str]:
    """Write (or, with ``check``, compare) every exercise notebook; returns the stale/changed names."""
    solutions, exercises = root / "solutions", root / "exercises"
    expected = {p.name: build_notebook(p) for p in sorted(solutions.glob("*.ipynb"))}
    existing = {p.name for p in exercises.glob("*.ipynb")}
    changed = [name for name, text in expected.items()
               if not (exercises / name).exists() or (exercises / name).read_text() != text]
    orphans = sorted(existing - set(expected))
    if not check:
        exercises.mkdir(exist_ok=True)
        for name in changed:
            (exercises / name).write_text(expected[name])
        for name in orphans:
            (exercises / name).unlink()
    return changed + orphans


def execute_in_place(paths: list[Path], cell_timeout: int = 600) -> None:
    """Re-run notebooks top to bottom and save them with fresh outputs (what the forge shows)."""
    import nbformat

    from .notebook_run import execute_notebook

    for path in paths:
        nb = nbformat.read(path, as_version=4)
        execute_notebook(nb, path.parent, cell_timeout=cell_timeout)
        nbformat.write(nb, path)
        print(f"executed {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.build", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if exercises/ is not what the build would write")
    parser.add_argument("--execute", nargs="*", type=Path, metavar="NOTEBOOK",
                        help="first re-execute these notebooks in place (all of notebooks/ and solutions/ if none given)")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.execute is not None:
        execute_in_place(args.execute or sorted([*(args.root / "notebooks").glob("*.ipynb"),
                                                 *(args.root / "solutions").glob("*.ipynb")]))
    try:
        names = build(args.root, check=args.check)
    except BuildError as e:
        print(f"build: error: {e}", file=sys.stderr)
        return 2
    if args.check:
        if names:
            print(f"exercises/ is stale: {', '.join(names)} — run `python -m course_lib.build` and commit",
                  file=sys.stderr)
            return 1
        print("exercises/ is up to date")
    else:
        print(f"wrote {', '.join(names)}" if names else "exercises/ already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
