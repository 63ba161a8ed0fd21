"""Grade a whole exercise notebook in its own kernel: ``course-grade PATH [--json] [--timeout S]``.

The notebook runs top to bottom in a fresh kernel with errors allowed (a crashing cell does not
stop the others), then one appended cell per exercise runs the hidden check and writes its verdict
as JSON to a file this run names in a fresh temporary folder, so nothing the learner prints can
lose or garble a verdict (cell outputs are only read for errors). Every way a notebook can break —
an exception, an endless loop, ``sys.exit``, a dead kernel, a flood of output — ends as a verdict
in the scorecard, never as a grader traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..notebook_run import execute_notebook
from . import ExerciseResult, exercises_for

MAX_OUTPUT_CHARS = 20_000  # per cell, in the stored copy: a flood of prints must not eat memory
SETUP_TIMEOUT = 300  # seconds to import the checks (torch, transformers) on a busy machine


class GradingError(Exception):
    """The notebook cannot be graded at all (missing, not a notebook, no exercises)."""


@dataclass
class Scorecard:
    notebook: str
    lesson: str
    results: list[ExerciseResult]
    problems: list[str] = field(default_factory=list)  # cells that raised, timed out, killed the kernel
    seconds: float = 0.0

    @property
    def score(self) -> int:
        return sum(r.points for r in self.results)

    @property
    def total(self) -> int:
        return len(self.results)

    @property
    def passed(self) -> bool:
        return self.score == self.total

    def to_json(self) -> dict:
        return {"notebook": self.notebook, "lesson": self.lesson, "score": self.score, "total": self.total,
                "seconds": round(self.seconds, 1), "problems": self.problems,
                "results": [asdict(r) for r in self.results]}

    def format(self) -> str:
        lines = [f"Grading {self.notebook} (lesson {self.lesson})"]
        width = max(len(r.title) for r in self.results) + 2
        for r in self.results:
            mark = "PASS" if r.passed else "FAIL"
            lines.append(f"  {r.id}  {r.title.ljust(width, '.')} {mark}  {r.feedback}")
        if self.problems:
            lines.append("Problems while running the notebook:")
            lines += [f"  - {p}" for p in self.problems]
        lines.append(f"Score: {self.score}/{self.total}")
        return "\n".join(lines)


def _lesson_of(nb, path: Path) -> str:
    lesson = nb.metadata.get("course", {}).get("lesson")
    if lesson:
        return lesson
    if path.name[:2].isdigit():
        return path.name[:2]
    raise GradingError(f"{path}: cannot tell which lesson this is (name it NN_….ipynb)")


def read_notebook(path: Path):
    import nbformat

    if not path.exists():
        raise GradingError(f"{path}: no such file")
    if path.suffix != ".ipynb":
        raise GradingError(f"{path}: not a notebook (expected a .ipynb file)")
    try:
        return nbformat.read(path, as_version=4)
    except Exception as e:  # nbformat raises several kinds for bad JSON / schema
        raise GradingError(f"{path}: not a valid notebook ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def _describe_error(output, cell_timeout: float) -> str:
    # The grader interrupts a cell that runs over its time; the kernel then reports KeyboardInterrupt.
    if output.get("ename") in ("KeyboardInterrupt", "TimeoutError"):
        return f"ran over the time limit ({cell_timeout:.0f} s per cell) and was stopped: an endless loop?"
    return f"raised {output.get('ename')}: {str(output.get('evalue'))[:200]}"


def _cell_problem(index: int, cell, cell_timeout: float) -> str | None:
    for output in cell.get("outputs", []):
        if output.get("output_type") == "error":
            head = cell.source.strip().splitlines()[0][:60] if cell.source.strip() else ""
            return f"cell {index + 1} ({head!r}) {_describe_error(output, cell_timeout)}"
    return None


def _truncate_outputs(cell) -> None:
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream" and len(output.get("text", "")) > MAX_OUTPUT_CHARS:
            output["text"] = output["text"][:MAX_OUTPUT_CHARS] + "\n[... output truncated by course-grade]\n"


def _read_verdict(path: Path) -> ExerciseResult | None:
    """The verdict a grading cell wrote, or None when its check never finished."""
    try:
        return ExerciseResult(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as e:  # only code that tampers with the file gets here
        return ExerciseResult(path.stem, "", False, f"not graded: the check's verdict was unreadable ({e})")


def grade_notebook(path: str | Path, *, timeout: float = 300, cell_timeout: float = 60) -> Scorecard:
    """Execute and grade; ``timeout`` bounds the whole run, ``cell_timeout`` each cell."""
    path = Path(path)
    nb = read_notebook(path)
    lesson = _lesson_of(nb, path)
    try:
        exercises = exercises_for(lesson)
    except ValueError as e:
        raise GradingError(f"{path}: {e}") from None
    with tempfile.TemporaryDirectory(prefix="course-grade-") as verdict_dir:
        verdict_paths = {exercise.id: Path(verdict_dir) / f"{exercise.id}.json" for exercise in exercises}
        return _grade(nb, path, lesson, exercises, verdict_paths, timeout, cell_timeout)


def _grade(nb, path: Path, lesson: str, exercises, verdict_paths: dict[str, Path],
           timeout: float, cell_timeout: float) -> Scorecard:
    import nbformat
    from nbclient.exceptions import DeadKernelError

    n_learner_cells = len(nb.cells)
    # Import the checks (and torch with them) before any check's clock starts: on a busy machine the
    # import alone can take longer than a check may, and a cell interrupted mid-import leaves torch
    # half-initialised for every check after it.
    nb.cells.append(nbformat.v4.new_code_cell(
        f"from course_lib.grading import exercises_for\nexercises_for({lesson!r})",
        metadata={"tags": ["course-grade-setup"]}))
    for exercise in exercises:
        nb.cells.append(nbformat.v4.new_code_cell(
            "from course_lib.grading import grade_in_kernel\n"
            f"grade_in_kernel({exercise.id!r}, globals(), {str(verdict_paths[exercise.id])!r})",
            metadata={"tags": ["course-grade"], "exercise": exercise.id}))

    start = time.monotonic()
    deadline = start + timeout

    def timeout_for(cell) -> int:
        # The grading cells get their own allowance so a slow notebook still gets graded.
        tags = cell.metadata.get("tags", [])
        if "course-grade-setup" in tags:
            return max(int(cell_timeout), SETUP_TIMEOUT)
        if "course-grade" in tags:
            return int(cell_timeout)
        return max(1, int(min(cell_timeout, deadline - time.monotonic())))

    running = {"cell": None}

    def note_start(cell, cell_index):
        running["cell"] = cell_index

    problems: list[str] = []
    try:
        execute_notebook(nb, path.parent, cell_timeout=cell_timeout, timeout_for=timeout_for,
                         allow_errors=True, interrupt_on_timeout=True, record_timing=False,
                         on_cell_execute=note_start)
    except DeadKernelError:
        dead_at = running["cell"]
        where = f"cell {dead_at + 1}" if dead_at is not None and dead_at < n_learner_cells else "a grading cell"
        problems.append(f"the kernel died while running {where} (os._exit, a crash in native code, "
                        f"or running out of memory)")
    except Exception as e:  # kernel failed to start, etc.: still a verdict, not a traceback
        problems.append(f"the notebook could not be run: {type(e).__name__}: {str(e).splitlines()[0][:200]}")

    results: dict[str, ExerciseResult] = {}
    for index, cell in enumerate(nb.cells):
        _truncate_outputs(cell)
        if index < n_learner_cells:
            if cell.cell_type == "code" and (problem := _cell_problem(index, cell, cell_timeout)):
                problems.append(problem)
            continue
        if "course-grade-setup" in cell.metadata.get("tags", []):
            if error := next((o for o in cell.get("outputs", []) if o.get("output_type") == "error"), None):
                problems.append(f"the grader could not import its checks "
                                f"({error.get('ename')}: {str(error.get('evalue'))[:200]})")
            continue
        exercise_id = cell.metadata["exercise"]
        verdict = _read_verdict(verdict_paths[exercise_id])
        error = next((o for o in cell.get("outputs", []) if o.get("output_type") == "error"), None)
        if verdict is None and error is not None:
            verdict = ExerciseResult(
                exercise_id, "", False, f"the check could not finish: your code {_describe_error(error, cell_timeout)}")
        if verdict is not None:
            results[exercise_id] = verdict
    ordered = []
    for exercise in exercises:
        result = results.get(exercise.id)
        if result is None:
            result = ExerciseResult(exercise.id, exercise.title, False,
                                    "not graded: the notebook stopped before its check could run (see problems)")
        result.title = exercise.title
        ordered.append(result)
    return Scorecard(str(path), lesson, ordered, problems, time.monotonic() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="course-grade", description="Grade an exercise notebook.")
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--json", action="store_true", help="print the scorecard as JSON")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for the whole notebook (default %(default)s)")
    parser.add_argument("--cell-timeout", type=float, default=60, help="seconds per cell (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        card = grade_notebook(args.notebook, timeout=args.timeout, cell_timeout=args.cell_timeout)
    except GradingError as e:
        print(f"course-grade: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(card.to_json(), indent=2) if args.json else card.format())
    return 0 if card.passed else 1


if __name__ == "__main__":
    sys.exit(main())
