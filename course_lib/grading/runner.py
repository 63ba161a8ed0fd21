"""Grade exercise notebooks: ``course-grade SUBMISSION [SUBMISSION ...] [--json] [--csv F] [--jobs N]``.

For each submission: the handout's cells are restored around the learner's exercise cells (cells the
learner added stay), the notebook runs top to bottom in a fresh kernel with errors allowed, and one
appended cell per exercise *records* what the learner's functions return on the check's inputs
(:mod:`course_lib.grading.sandbox`). The verdict is then computed here, in a process that never runs
learner code, by replaying each check against its recording (data only, read with
``torch.load(weights_only=True)``). A cell that kills the kernel is skipped in a fresh run, so it costs
its own exercise alone; an exception, an endless loop, ``sys.exit``, a flood of output or a memory
blow-up in the learner's kernel ends as a verdict, never as a grader traceback.

Interrupting ``course-grade`` (Ctrl-C: SIGINT; ``kill``, a cancelled job: SIGTERM) stops it within
seconds: every kernel and worker process it started is shut down (a worker that does not stop within
:data:`STOP_GRACE` seconds is killed with the processes below it), it says on stderr what was and was not
done, and it exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM). Nothing is written:
the gradebook (``--csv``, ``--gradebook-json``) is written only when the whole batch is done, through a
temporary file and a rename, so a file under its name is always a complete gradebook (an earlier run's,
should this one be interrupted, which the message points out).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..notebook_run import Interrupted, execute_notebook, raise_if_interrupted, stop_signals_raise_interrupted
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


def pristine_handout(lesson: str, root: Path | None = None) -> Path | None:
    """The exercise notebook as handed out (``exercises/NN_*.ipynb`` beside this package), if present."""
    from ..build import ROOT

    found = sorted(((root or ROOT) / "exercises").glob(f"{lesson}_*.ipynb"))
    return found[0] if found else None


def _is_exercise_cell(cell) -> bool:
    return cell.cell_type == "code" and 'raise NotImplementedError("Exercise' in cell.source


def assemble(submission, handout) -> tuple[object, list[str]]:
    """The notebook to run: the handout's cells, except that each exercise cell is the learner's (as in
    nbgrader, the cells around the exercises are locked); cells the learner added stay where they were.
    Cells are matched by their ids. Returns the notebook and notes for the learner."""
    import copy

    known = {cell.get("id") for cell in handout.cells if cell.get("id")}
    submitted = {cell.get("id"): cell for cell in submission.cells if cell.get("id") in known}
    if not submitted:
        return submission, ["the notebook's cells could not be matched to the handout's (no shared cell ids), "
                            "so it was graded as submitted: start from the notebook in exercises/"]
    added: dict[str | None, list] = {}
    previous = None
    for cell in submission.cells:
        if cell.get("id") in known:
            previous = cell.get("id")
        else:
            added.setdefault(previous, []).append(cell)
    cells, restored, notes = list(added.get(None, [])), [], []
    for index, cell in enumerate(handout.cells):
        mine = submitted.get(cell.get("id"))
        if _is_exercise_cell(cell) and mine is not None and mine.cell_type == "code":
            cells.append(mine)
        else:
            if mine is not None and cell.cell_type == "code" and mine.source != cell.source:
                restored.append(index + 1)  # (edited Markdown is restored too, without a word: it runs nothing)
            cells.append(copy.deepcopy(cell))
        cells.extend(added.get(cell.get("id"), []))
    if restored:
        notes.append(f"handout cell(s) {', '.join(map(str, restored))} were edited outside the exercise cells and "
                     f"were graded as handed out: write your answers in the exercise cells (and new cells)")
    notebook = copy.deepcopy(handout)
    notebook.cells = cells
    return notebook, notes


def grade_notebook(path: str | Path, *, timeout: float = 300, cell_timeout: float = 60,
                   memory_gb: float = 8, handout: str | Path | bool | None = None) -> Scorecard:
    """Execute and grade; ``timeout`` bounds the whole run, ``cell_timeout`` each cell, ``memory_gb`` the
    learner's kernel. ``handout``: the pristine exercise notebook whose non-exercise cells are restored
    (default: ``exercises/`` of this course; False: grade the notebook exactly as submitted)."""
    path = Path(path)
    nb = read_notebook(path)
    lesson = _lesson_of(nb, path)
    try:
        exercises = exercises_for(lesson)
    except ValueError as e:
        raise GradingError(f"{path}: {e}") from None
    handout_path = None if handout is False else Path(handout) if handout else pristine_handout(lesson)
    notes = []
    if handout_path is not None and handout_path.resolve() != path.resolve():
        nb, notes = assemble(nb, read_notebook(handout_path))
    with tempfile.TemporaryDirectory(prefix="course-grade-") as recording_dir:
        recordings = {exercise.id: Path(recording_dir) / f"{exercise.id}.pt" for exercise in exercises}
        card = _grade(nb, path, lesson, exercises, recordings, timeout, cell_timeout, memory_gb)
    card.problems = notes + card.problems
    return card


SKIPPED = "# course-grade: this cell killed the kernel in an earlier run, so it is skipped"


def _grade(nb, path: Path, lesson: str, exercises, recordings: dict[str, Path],
           timeout: float, cell_timeout: float, memory_gb: float) -> Scorecard:
    """Run the learner's notebook (and, appended, one recording cell per exercise) in a kernel; when a cell
    kills the kernel, run again without it. Then judge each exercise here, from its recording."""
    import copy

    import nbformat
    from nbclient.exceptions import DeadKernelError

    from .sandbox import judge, read_recording

    n_learner_cells = len(nb.cells)
    # Limit the kernel's memory (its heap: RLIMIT_DATA, which leaves the mapped libraries alone), then
    # import the checks (and torch with them) before any check's clock starts: on a busy machine the
    # import alone can take longer than a check may.
    nb.cells.insert(0, nbformat.v4.new_code_cell(
        "import resource as _r\nimport course_lib.grading as _g\n"
        f"_g.preload({lesson!r})\nimport course_lib.grading.sandbox\n"
        f"_r.setrlimit(_r.RLIMIT_DATA, ({int(memory_gb * 2**30)}, _r.getrlimit(_r.RLIMIT_DATA)[1]))\ndel _r, _g",
        metadata={"tags": ["course-grade-setup"]}))
    for exercise in exercises:
        nb.cells.append(nbformat.v4.new_code_cell(
            "from course_lib.grading.sandbox import record_in_kernel\n"
            f"record_in_kernel({exercise.id!r}, globals(), {str(recordings[exercise.id])!r})",
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

    problems: list[str] = []
    died_in: dict[str, str] = {}  # exercise id -> what happened to its recording cell
    skipped: set[int] = set()
    while True:
        run = copy.deepcopy(nb)
        for index in skipped:
            run.cells[index].source = SKIPPED
        running = {"cell": None}
        for recording in recordings.values():
            recording.unlink(missing_ok=True)
        try:
            execute_notebook(run, path.parent, cell_timeout=cell_timeout, timeout_for=timeout_for,
                             allow_errors=True, interrupt_on_timeout=True, record_timing=False,
                             on_cell_execute=lambda cell, index: running.update(cell=index))
        except DeadKernelError:
            dead_at = running["cell"]
            if dead_at is None or dead_at in skipped or time.monotonic() > deadline:
                problems.append("the kernel died and the notebook could not be run to the end")
                break
            skipped.add(dead_at)
            cell = run.cells[dead_at]
            if "course-grade" in cell.metadata.get("tags", []) and "exercise" in cell.metadata:
                died_in[cell.metadata["exercise"]] = (
                    "the kernel died while the check ran your code (os._exit, a crash in native code, or "
                    "running out of memory)")
            elif 0 < dead_at <= n_learner_cells:
                problems.append(f"the kernel died while running cell {dead_at} (os._exit, a crash in native "
                                f"code, or running out of memory): graded again without that cell")
            else:
                problems.append("the kernel died while setting up the grading")
            continue
        except Exception as e:  # kernel failed to start, etc.: still a verdict, not a traceback
            problems.append(f"the notebook could not be run: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        break

    errors: dict[str, dict] = {}
    for index, cell in enumerate(run.cells):
        _truncate_outputs(cell)
        tags = cell.metadata.get("tags", [])
        error = next((o for o in cell.get("outputs", []) if o.get("output_type") == "error"), None)
        if "course-grade-setup" in tags:
            if error is not None:
                problems.append(f"the grader could not set up its checks "
                                f"({error.get('ename')}: {str(error.get('evalue'))[:200]})")
        elif "course-grade" in tags:
            if error is not None:
                errors[cell.metadata["exercise"]] = error
        elif cell.cell_type == "code" and index not in skipped and (problem := _cell_problem(index - 1, cell, cell_timeout)):
            problems.append(problem)

    ordered = []
    for exercise in exercises:
        result = None
        if recordings[exercise.id].exists():
            try:
                result = judge(exercise, read_recording(recordings[exercise.id]))
            except Exception as e:  # a recording the judge cannot read: only tampering gets here
                result = ExerciseResult(exercise.id, exercise.title, False,
                                        f"not graded: the recording of your code's answers was unreadable "
                                        f"({type(e).__name__})")
        elif exercise.id in died_in:
            result = ExerciseResult(exercise.id, exercise.title, False, died_in[exercise.id])
        elif exercise.id in errors:
            result = ExerciseResult(exercise.id, exercise.title, False,
                                    f"the check could not finish: your code {_describe_error(errors[exercise.id], cell_timeout)}")
        else:
            result = ExerciseResult(exercise.id, exercise.title, False,
                                    "not graded: the notebook stopped before its check could run (see problems)")
        result.title = exercise.title
        ordered.append(result)
    return Scorecard(str(path), lesson, ordered, problems, time.monotonic() - start)


def submissions_in(targets: list[str]) -> list[Path]:
    """Notebooks named by files, folders (every ``*.ipynb`` inside, checkpoints excluded) or glob patterns,
    in a stable order and each once. A target that names nothing is an error."""
    import glob

    found: list[Path] = []
    for target in targets:
        path = Path(target)
        if path.is_dir():
            matches = [p for p in sorted(path.rglob("*.ipynb")) if ".ipynb_checkpoints" not in p.parts]
        elif any(c in target for c in "*?["):
            matches = [Path(p) for p in sorted(glob.glob(target, recursive=True))]
        else:
            matches = [path]
        if not matches:
            raise GradingError(f"{target}: no notebooks there")
        found += matches
    return list(dict.fromkeys(found))


def _grade_one(path: Path, options: dict) -> dict:
    """One submission's scorecard as JSON, or the reason it could not be graded (never raises)."""
    try:
        return grade_notebook(path, **options).to_json()
    except GradingError as e:
        return {"notebook": str(path), "error": str(e)}
    except Exception as e:  # a grader bug must not stop a class's batch
        return {"notebook": str(path), "error": f"the grader failed: {type(e).__name__}: {str(e)[:300]}"}


STOP_GRACE = 8.0  # seconds an interrupted worker gets to shut its kernel down before it is killed


class BatchInterrupted(Interrupted):
    """A batch stopped by SIGINT/SIGTERM: every worker and kernel it started is gone; ``graded`` holds the
    scorecards finished before the signal (never written as a gradebook)."""

    def __init__(self, signum: int, graded: list[dict], total: int, stopped: int):
        super().__init__(signum, f"interrupted by {signal.Signals(signum).name} after {len(graded)} of {total} "
                                 f"submission(s); {stopped} grading(s) in progress stopped")
        self.graded, self.total, self.stopped = graded, total, stopped


def _signum(interrupt: KeyboardInterrupt) -> int:
    return interrupt.signum if isinstance(interrupt, Interrupted) else signal.SIGINT


def _grade_in_worker(path: Path, options: dict, results) -> None:
    """A worker process's whole life: grade one submission and send its scorecard (JSON data) back. On
    SIGINT/SIGTERM its kernel is shut down (:func:`execute_notebook`) and it exits with 128 + the signal."""
    with stop_signals_raise_interrupted():
        try:
            card = _grade_one(path, options)
            raise_if_interrupted()  # one swallowed on the way (see raise_if_interrupted)
        except KeyboardInterrupt as e:
            sys.exit(128 + _signum(e))
    results.send(card)
    results.close()


@contextmanager
def _signals_ignored():
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stop_workers(workers: list, grace: float = STOP_GRACE) -> None:
    """SIGTERM each worker still running (each shuts its kernel down and exits), wait up to ``grace``
    seconds, then SIGKILL any left together with every process below it (its kernel)."""
    import psutil

    workers = [worker for worker in workers if worker.pid is not None]  # (one interrupted before it started)
    below = {}
    for worker in workers:
        try:
            below[worker.pid] = psutil.Process(worker.pid).children(recursive=True)
        except psutil.Error:
            below[worker.pid] = []
        if worker.is_alive():
            worker.terminate()
    deadline = time.monotonic() + grace
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join(5)
        for child in below[worker.pid]:
            try:
                child.kill()  # a kernel whose worker died before it could shut it down
            except psutil.Error:
                pass


def grade_many(paths: list[Path], *, jobs: int = 1, **options) -> list[dict]:
    """Grade many submissions, ``jobs`` at a time: with ``jobs > 1`` each submission in a worker process of
    its own (its kernel, its judge), started with ``spawn``. Returns the scorecards in the order of ``paths``.

    SIGINT/SIGTERM (while :func:`stop_signals_raise_interrupted` is in force, as under ``course-grade``)
    stops the batch: running workers are stopped with their kernels (SIGKILL after :data:`STOP_GRACE`
    seconds), none is started, and :class:`BatchInterrupted` is raised with what was finished."""
    if jobs <= 1 or len(paths) <= 1:
        cards = []
        for path in paths:
            try:
                raise_if_interrupted()
                card = _grade_one(path, options)
            except KeyboardInterrupt as e:
                raise BatchInterrupted(_signum(e), cards, len(paths), 1) from None
            cards.append(card)
        return cards
    import multiprocessing
    from multiprocessing.connection import wait

    context = multiprocessing.get_context("spawn")
    cards: dict[int, dict] = {}
    running: dict[int, tuple] = {}  # index in paths -> (worker process, the end its scorecard arrives on)
    waiting = list(enumerate(paths))
    try:
        while waiting or running:
            raise_if_interrupted()
            while waiting and len(running) < jobs:
                index, path = waiting.pop(0)
                receive, send = context.Pipe(duplex=False)
                worker = context.Process(target=_grade_in_worker, args=(path, options, send),
                                         name=f"course-grade {path.name}")
                running[index] = (worker, receive)  # before it starts: an interrupt from here on stops it
                worker.start()
                send.close()  # the worker holds the other end: its exit without a scorecard reads as EOF
            ready = wait([receive for _, receive in running.values()])
            for index, (worker, receive) in list(running.items()):
                if receive not in ready:
                    continue
                try:
                    cards[index] = receive.recv()
                except EOFError:
                    worker.join(5)
                    cards[index] = {"notebook": str(paths[index]),
                                    "error": f"the grader's worker process ended without a scorecard "
                                             f"(exit code {worker.exitcode})"}
                worker.join(30)  # it exits once its scorecard is sent; one that hangs on the way out
                if worker.is_alive():  # (its kernel already shut down) must not hold up the batch
                    worker.kill()
                receive.close()
                del running[index]
    except KeyboardInterrupt as e:
        with _signals_ignored():  # a second Ctrl-C must not cut the stopping short and orphan a kernel
            _stop_workers([worker for worker, _ in running.values()])
        raise BatchInterrupted(_signum(e), [cards[i] for i in sorted(cards)], len(paths), len(running)) from None
    return [cards[index] for index in range(len(paths))]


GRADEBOOK_FIELDS = ("submission", "lesson", "exercise", "title", "passed", "points", "feedback")


def gradebook_rows(cards: list[dict]) -> list[dict]:
    """One row per submission and exercise, then a total row per submission (exercise ``TOTAL``)."""
    rows = []
    for card in cards:
        if "error" in card:
            rows.append({"submission": card["notebook"], "lesson": "", "exercise": "TOTAL", "title": "",
                         "passed": False, "points": 0, "feedback": f"not graded: {card['error']}"})
            continue
        for r in card["results"]:
            rows.append({"submission": card["notebook"], "lesson": card["lesson"], "exercise": r["id"],
                         "title": r["title"], "passed": r["passed"], "points": int(r["passed"]),
                         "feedback": r["feedback"]})
        rows.append({"submission": card["notebook"], "lesson": card["lesson"], "exercise": "TOTAL",
                     "title": f"{card['score']}/{card['total']}", "passed": card["score"] == card["total"],
                     "points": card["score"], "feedback": "; ".join(card["problems"])[:2000]})
    return rows


def write_gradebook(cards: list[dict], csv_path: Path | None = None, json_path: Path | None = None) -> None:
    import csv
    import io

    from ..lab import write_atomically  # an interrupted run leaves no half-written gradebook

    if csv_path is not None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=GRADEBOOK_FIELDS)
        writer.writeheader()
        writer.writerows(gradebook_rows(cards))
        write_atomically(csv_path, buffer.getvalue())
    if json_path is not None:
        write_atomically(json_path, json.dumps({"submissions": cards}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="course-grade", description="Grade exercise notebooks: one (a scorecard) or a class's (a gradebook).")
    parser.add_argument("submissions", nargs="+", metavar="SUBMISSION",
                        help="notebooks, folders of notebooks, or glob patterns")
    parser.add_argument("--json", action="store_true", help="print the scorecard(s) as JSON")
    parser.add_argument("--csv", type=Path, help="write a gradebook: one row per submission and exercise, plus totals")
    parser.add_argument("--gradebook-json", type=Path, help="write the gradebook as JSON (every scorecard)")
    parser.add_argument("--jobs", type=int, default=1, help="submissions graded at once (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for a whole notebook (default %(default)s)")
    parser.add_argument("--cell-timeout", type=float, default=60, help="seconds per cell (default %(default)s)")
    parser.add_argument("--memory-gb", type=float, default=8, help="memory for a learner's kernel (default %(default)s)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give 1 or more")
    try:
        paths = submissions_in(args.submissions)
    except GradingError as e:
        print(f"course-grade: error: {e}", file=sys.stderr)
        return 2
    options = {"timeout": args.timeout, "cell_timeout": args.cell_timeout, "memory_gb": args.memory_gb}
    # SIGTERM (kill, a cancelled job) stops a grading as Ctrl-C does: kernels and workers are shut down,
    # nothing is written, and the exit code says which signal it was (128 + its number: 130, 143).
    with stop_signals_raise_interrupted():
        try:
            return _grade_and_report(paths, args, options)
        except KeyboardInterrupt as e:
            stopped = e if isinstance(e, Interrupted) else Interrupted(_signum(e))
            print(f"\ncourse-grade: {_interruption_report(stopped, paths, args)}", file=sys.stderr)
            return stopped.exit_code


def _interruption_report(stopped: Interrupted, paths: list[Path], args) -> str:
    """What an interrupted run did and did not do, for the terminal."""
    if isinstance(stopped, BatchInterrupted):
        done = f"{len(stopped.graded)} of {stopped.total} submission(s) graded, {stopped.stopped} stopped " \
               f"(with any kernel they had started)"
    else:
        done = f"grading of {paths[0]} stopped (with its kernel, if one had started); no score given"
    books = [str(p) for p in (args.csv, args.gradebook_json) if p is not None]
    if books:
        earlier = [b for b in books if Path(b).exists()]
        done += f"; no gradebook written ({', '.join(books)})"
        if earlier:
            done += f" — the file(s) there ({', '.join(earlier)}) are from an earlier, complete run"
    return f"interrupted by {stopped.signal_name}: {done}"


def _grade_and_report(paths: list[Path], args, options: dict) -> int:
    if len(paths) == 1 and not (args.csv or args.gradebook_json):
        try:
            card = grade_notebook(paths[0], **options)
        except GradingError as e:
            print(f"course-grade: error: {e}", file=sys.stderr)
            return 2
        raise_if_interrupted()  # a signal whose KeyboardInterrupt was swallowed on the way: no score
        print(json.dumps(card.to_json(), indent=2) if args.json else card.format())
        return 0 if card.passed else 1
    cards = grade_many(paths, jobs=args.jobs, **options)
    try:
        raise_if_interrupted()
    except Interrupted as e:
        raise BatchInterrupted(e.signum, cards, len(paths), 0) from None
    write_gradebook(cards, args.csv, args.gradebook_json)  # only a finished batch writes one
    if args.json:
        print(json.dumps({"submissions": cards}, indent=2))
    else:
        for card in cards:
            score = f"{card['score']}/{card['total']}" if "error" not in card else f"not graded: {card['error']}"
            print(f"{score:>8}  {card['notebook']}")
    if any("error" in card for card in cards):
        return 2
    return 0 if all(card["score"] == card["total"] for card in cards) else 1

if __name__ == "__main__":
    sys.exit(main())
