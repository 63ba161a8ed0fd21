"""Grade a whole exercise notebook in its own kernel: ``course-grade PATH [--json] [--timeout S]``.

The notebook runs top to bottom in a fresh kernel with errors allowed (a crashing cell does not
stop the others), then one appended cell per exercise runs the hidden check and prints a marked
JSON line. Every way a notebook can break — an exception, an endless loop, ``sys.exit``, a dead
kernel, a flood of output — ends as a verdict in the scorecard, never as a grader traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import GRADE_MARKER, ExerciseResult, exercises_for

MAX_OUTPUT_CHARS = 20_000  # per cell, in the stored copy: a flood of prints must not eat memory


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


def grade_notebook(path: str | Path, *, timeout: float = 300, cell_timeout: float = 60) -> Scorecard:
    """Execute and grade; ``timeout`` bounds the whole run, ``cell_timeout`` each cell."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    path = Path(path)
    nb = read_notebook(path)
    lesson = _lesson_of(nb, path)
    try:
        exercises = exercises_for(lesson)
    except ValueError as e:
        raise GradingError(f"{path}: {e}") from None
    n_learner_cells = len(nb.cells)
    for exercise in exercises:
        nb.cells.append(nbformat.v4.new_code_cell(
            f"from course_lib.grading import grade_in_kernel\ngrade_in_kernel({exercise.id!r}, globals())",
            metadata={"tags": ["course-grade"], "exercise": exercise.id}))

    start = time.monotonic()
    deadline = start + timeout

    def timeout_for(cell) -> int:
        # The grading cells get their own allowance so a slow notebook still gets graded.
        if "course-grade" in cell.metadata.get("tags", []):
            return int(cell_timeout)
        return max(1, int(min(cell_timeout, deadline - time.monotonic())))

    client = NotebookClient(
        nb, timeout=int(cell_timeout), timeout_func=timeout_for, kernel_name="python3", allow_errors=True,
        interrupt_on_timeout=True, record_timing=False,
        error_on_timeout={"ename": "TimeoutError", "evalue": "", "traceback": []},
        resources={"metadata": {"path": str(path.parent.resolve())}})
    running = {"cell": None}

    def note_start(cell, cell_index):
        running["cell"] = cell_index

    client.on_cell_execute = note_start
    problems: list[str] = []
    try:
        client.execute()
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
        for output in cell.get("outputs", []):
            text = output.get("text", "") if output.get("output_type") == "stream" else ""
            for line in text.splitlines():
                if line.startswith(GRADE_MARKER):
                    results_json = json.loads(line[len(GRADE_MARKER):])
                    results[results_json["id"]] = ExerciseResult(**results_json)
        if cell.get("outputs") and not any(GRADE_MARKER in o.get("text", "") for o in cell.outputs):
            error = next((o for o in cell.outputs if o.get("output_type") == "error"), None)
            if error is not None:
                exercise_id = cell.metadata["exercise"]
                results[exercise_id] = ExerciseResult(
                    exercise_id, "", False, f"the check could not finish: your code {_describe_error(error, cell_timeout)}")
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
