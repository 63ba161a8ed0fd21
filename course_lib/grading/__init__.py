"""Exercise checks: instant feedback in the notebook (`check`) and hidden tests for `course-grade`.

Each lesson has a module ``course_lib.grading.lesson_NN`` with a list ``EXERCISES``. An
:class:`Exercise` names the functions the learner writes and a check that calls them on seeded
and edge-case inputs, compares with the reference (course_lib or the production library) and,
when the answer is wrong, says which plausible mistake it matches.
"""

from __future__ import annotations

import importlib
import json
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable


class CheckFailed(AssertionError):
    """A learner's answer is wrong; the message says how, in the learner's terms."""


@dataclass(frozen=True)
class Exercise:
    id: str  # "00.1"
    title: str
    names: tuple[str, ...]  # the names the learner defines, passed to `check` in this order
    check: Callable[..., str | None]  # raises CheckFailed; may return a short success note


@dataclass
class ExerciseResult:
    id: str
    title: str
    passed: bool
    feedback: str

    @property
    def points(self) -> int:
        return int(self.passed)


def exercises_for(lesson: str) -> list[Exercise]:
    try:
        module = importlib.import_module(f"{__name__}.lesson_{lesson}")
    except ModuleNotFoundError:
        raise ValueError(f"lesson {lesson} has no exercises to grade") from None
    return module.EXERCISES


def find_exercise(exercise_id: str) -> Exercise:
    lesson = exercise_id.split(".")[0]
    for exercise in exercises_for(lesson):
        if exercise.id == exercise_id:
            return exercise
    raise ValueError(f"unknown exercise {exercise_id!r}")


def run_exercise(exercise: Exercise, objects: list) -> ExerciseResult:
    """Run one check and turn every way it can go wrong into feedback (never a traceback)."""
    def result(passed: bool, feedback: str) -> ExerciseResult:
        return ExerciseResult(exercise.id, exercise.title, passed, feedback)

    try:
        note = exercise.check(*objects)
    except NotImplementedError:
        return result(False, "not implemented yet: replace the `raise NotImplementedError` line with your code")
    except CheckFailed as e:
        return result(False, str(e))
    except RecursionError:
        return result(False, "your code recursed without end (RecursionError)")
    except Exception as e:  # the learner's code crashed inside the check
        frame = traceback.extract_tb(e.__traceback__)[-1]
        return result(False, f"your code raised {type(e).__name__}: {e} (line {frame.lineno}: {frame.line})")
    return result(True, note or "passed")


def check(exercise_id: str, *objects) -> ExerciseResult:
    """Instant feedback in a notebook: ``check("00.1", count_parameters)``.

    Prints a line when the exercise passes; raises an AssertionError whose message is the feedback
    when it does not, so the cell turns red.
    """
    exercise = find_exercise(exercise_id)
    if len(objects) != len(exercise.names):
        raise TypeError(f"check({exercise_id!r}, ...) takes {len(exercise.names)} object(s): {', '.join(exercise.names)}")
    outcome = run_exercise(exercise, list(objects))
    if not outcome.passed:
        raise CheckFailed(f"Exercise {exercise_id} ({exercise.title}): {outcome.feedback}")
    print(f"✓ Exercise {exercise_id} ({exercise.title}): {outcome.feedback}")
    return outcome


def grade_in_kernel(exercise_id: str, namespace: dict, verdict_path: str) -> None:
    """Run by the cells `course-grade` appends: look the learner's names up, check, and write the
    verdict as JSON to ``verdict_path`` (a fresh file the runner names for this run). The verdict
    goes to a file, not stdout, so nothing the learner's code prints can truncate or garble it."""
    exercise = find_exercise(exercise_id)
    missing = [name for name in exercise.names if name not in namespace]
    if missing:
        outcome = ExerciseResult(exercise.id, exercise.title, False,
                                 f"{', '.join(missing)} is not defined: keep the name the exercise gives, "
                                 f"and make sure its cell runs without error")
    else:
        outcome = run_exercise(exercise, [namespace[name] for name in exercise.names])
    partial = Path(f"{verdict_path}.partial")
    partial.write_text(json.dumps(asdict(outcome)))
    partial.replace(verdict_path)  # the runner sees a whole verdict or none


def _close(a, b, rtol: float, atol: float) -> bool:
    import torch

    try:
        ta, tb = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        return a == b
    return ta.shape == tb.shape and bool(torch.allclose(ta, tb, rtol=rtol, atol=atol))


def expect(got, expected, *, what: str, mistakes: dict[str, object] | None = None,
           rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Pass if ``got`` matches ``expected``; otherwise name the first known mistake ``got`` matches
    (``mistakes`` maps a learner-facing explanation to the value that mistake produces)."""
    if _close(got, expected, rtol, atol):
        return
    for explanation, wrong in (mistakes or {}).items():
        if _close(got, wrong, rtol, atol):
            raise CheckFailed(f"{what}: {explanation}")
    raise CheckFailed(f"{what}: expected {_short(expected)}, got {_short(got)}")


def _short(value) -> str:
    text = repr(value.tolist() if hasattr(value, "tolist") else value)
    return text if len(text) < 120 else text[:117] + "..."
