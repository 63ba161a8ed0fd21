"""Exercise checks: instant feedback in the notebook (`check`) and hidden tests for `course-grade`.

Each lesson has a module ``course_lib.grading.lesson_NN`` with a list ``EXERCISES``. An
:class:`Exercise` names the functions the learner writes and a check that calls them on seeded
and edge-case inputs, compares with the reference (course_lib or the production library) and,
when the answer is wrong, says which plausible mistake it matches.
"""

from __future__ import annotations

import importlib
import traceback
from dataclasses import dataclass
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
    changes_inputs: bool = False  # True where changing an input tensor in place is the exercise's job


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


def preload(lesson: str) -> list[Exercise]:
    """Import a lesson's checks and every course_lib module they import lazily (``from ..x import``), so
    that no check starts with a slow first import that a time limit could interrupt halfway."""
    import re

    exercises = exercises_for(lesson)
    source = Path(__file__).with_name(f"lesson_{lesson}.py").read_text()
    for name in sorted(set(re.findall(r"from \.\.(\w+) import", source))):
        importlib.import_module(f"course_lib.{name}")
    return exercises


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

    violations: list[str] = []
    if not exercise.changes_inputs:
        objects = [_InputGuard(obj, violations) if callable(obj) and not isinstance(obj, type) else obj
                   for obj in objects]
    try:
        note = exercise.check(*objects)
        if violations:  # only once the answer is otherwise right: a wrong value's own feedback says more
            raise CheckFailed(violations[0])
    except NotImplementedError:
        return result(False, "not implemented yet: replace the `raise NotImplementedError` line with your code")
    except CheckFailed as e:
        return result(False, str(e))
    except RecursionError:
        return result(False, "your code recursed without end (RecursionError)")
    except MemoryError:
        return result(False, "your code ran out of memory (MemoryError)")
    except Exception as e:  # the learner's code crashed inside the check (or, judged, did so when recorded)
        where = getattr(e, "learner_where", None)
        if where is None:
            frame = traceback.extract_tb(e.__traceback__)[-1]
            where = f" (line {frame.lineno}: {frame.line})"
        name = getattr(e, "learner_type", type(e).__name__)
        if name == "RuntimeError" and "can't allocate memory" in str(e):
            return result(False, f"your code ran out of memory ({str(e)[:160]})")
        message = str(e).removeprefix(f"{name}: ") if name != type(e).__name__ else str(e)
        return result(False, f"your code raised {name}: {message}{where}")
    return result(True, note or "passed")


class _InputGuard:
    """Calls a learner's function and notes when it changed an input tensor in place or returned a tensor
    that shares memory with one (callers keep using their inputs, so either is a bug here); the check
    fails on the first note once it has found nothing else wrong."""

    def __init__(self, fn, violations: list[str]):
        self.fn, self.violations = fn, violations
        self.__name__ = getattr(fn, "__name__", "function")

    def __call__(self, *args, **kwargs):
        import torch

        inputs = [(f"argument {i + 1}", a) for i, a in enumerate(args)] + list(kwargs.items())
        inputs = [(name, t) for name, t in inputs if isinstance(t, torch.Tensor)]
        before = [t.detach().clone() for _, t in inputs]
        out = self.fn(*args, **kwargs)
        for (name, t), old in zip(inputs, before):
            if t.shape != old.shape or not torch.equal(torch.nan_to_num(t.detach()), torch.nan_to_num(old)):
                self.violations.append(f"{self.__name__} changed its input {name} in place: compute new tensors "
                                       f"(e.g. x * s, not x.mul_(s)), since the caller keeps using its inputs")
        outs = out if isinstance(out, (tuple, list)) else (out,)
        storages = {t.untyped_storage().data_ptr(): name for name, t in inputs if t.numel()}
        for o in outs:
            if isinstance(o, torch.Tensor) and o.numel() and o.untyped_storage().data_ptr() in storages:
                self.violations.append(f"{self.__name__} returned a tensor that shares memory with its input "
                                       f"{storages[o.untyped_storage().data_ptr()]}: changing one would change the "
                                       f"other; return a new tensor (.clone())")
        return out


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
    import torch

    hint = ""
    if isinstance(got, torch.Tensor) and isinstance(expected, torch.Tensor) and got.dtype != expected.dtype:
        hint = (f" (your dtype is {str(got.dtype).removeprefix('torch.')}, the reference's "
                f"{str(expected.dtype).removeprefix('torch.')})")
    raise CheckFailed(f"{what}: expected {_short(expected)}, got {_short(got)}{hint}")


def _short(value) -> str:
    text = repr(value.tolist() if hasattr(value, "tolist") else value)
    return text if len(text) < 120 else text[:117] + "..."
