"""Record in the learner's process, judge in the grader's: the judged verdict equals the direct one for every
right answer and every catalogued mistake, and a recording can only pass by holding right answers."""

import io
import pickle

import pytest
import torch

from course_lib.grading import CheckFailed, Exercise, expect, find_exercise, run_exercise, sandbox

from .test_grading_checks import CATALOGUE, LESSONS, RIGHT


def _through_a_file(events):
    """What the judge reads: torch.save in the learner's kernel, torch.load(weights_only=True) here."""
    buffer = io.BytesIO()
    torch.save({"exercise": "x", "missing": [], "events": events}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def judged(exercise, fn):
    events, _ = sandbox.record(exercise, [fn])
    return sandbox.judge(exercise, _through_a_file(events))


@pytest.mark.parametrize("lesson", sorted(LESSONS))
def test_judged_verdicts_equal_the_direct_ones(lesson):
    cases = [(i, RIGHT[i], None) for i in sorted(RIGHT) if i.startswith(lesson)]
    per_exercise: dict[str, int] = {}
    for i, wrong, phrase in CATALOGUE:  # two mistakes per exercise: the direct checks try them all
        if i.startswith(lesson) and per_exercise.get(i, 0) < 2:
            per_exercise[i] = per_exercise.get(i, 0) + 1
            cases.append((i, wrong, phrase))
    for exercise_id, fn, phrase in cases:
        exercise = find_exercise(exercise_id)
        direct, verdict = run_exercise(exercise, [fn]), judged(exercise, fn)
        assert verdict.passed == direct.passed == (phrase is None), (exercise_id, fn.__name__, verdict.feedback)
        # the judge may add a note for the instructor (course_lib functions the code called)
        assert verdict.feedback.split(" [note for the instructor")[0] == direct.feedback, (exercise_id, fn.__name__)


def _identity_exercise():
    def check_identity(fn):
        x = torch.arange(6.0).view(2, 3)
        want = x.clone()
        expect(fn(x), want, what="the copy")
        return "copied"
    return Exercise("99.1", "copy a tensor", ("copy",), check_identity)


def test_returning_an_input_or_changing_it_in_place_fails_both_in_the_notebook_and_judged():
    exercise = _identity_exercise()
    for fn, says in ((lambda x: x.clone(), None), (lambda x: x, "shares memory"), (lambda x: x.view(3, 2).view(2, 3), "shares memory"),
                     (lambda x: x.mul_(1).add_(0), "shares memory")):
        for verdict in (run_exercise(exercise, [fn]), judged(exercise, fn)):
            assert verdict.passed == (says is None) and (says or "copied") in verdict.feedback, verdict.feedback

    def in_place(x):
        y = x.clone()
        x.zero_()
        return y
    for verdict in (run_exercise(exercise, [in_place]), judged(exercise, in_place)):
        assert not verdict.passed and "in place" in verdict.feedback


def test_a_tampered_recording_cannot_pass():
    exercise = find_exercise("03.1")
    events, _ = sandbox.record(exercise, [RIGHT["03.1"]])
    assert sandbox.judge(exercise, _through_a_file(events)).passed
    wrong_value = _through_a_file(events)
    wrong_value["events"][0]["value"]["__tensor__"].add_(1.0)
    assert "expected" in sandbox.judge(exercise, wrong_value).feedback
    other_inputs = _through_a_file(events)
    other_inputs["events"][0]["inputs"] = "0" * 16
    assert "different inputs" in sandbox.judge(exercise, other_inputs).feedback
    cut_short = _through_a_file(events[:1])
    assert "stopped before the check called" in sandbox.judge(exercise, cut_short).feedback
    empty = _through_a_file([])
    assert not sandbox.judge(exercise, empty).passed


class Sneaky:
    def __reduce__(self):  # what a forged pickle would do on load
        return (print, ("pwned",))


def test_the_judge_never_unpickles_objects(tmp_path):
    path = tmp_path / "03.1.pt"
    with open(path, "wb") as f:
        pickle.dump({"exercise": "03.1", "missing": [], "events": [Sneaky()]}, f)
    with pytest.raises(pickle.UnpicklingError):
        sandbox.read_recording(path)


def test_objects_that_are_not_data_and_learner_exceptions_are_named():
    exercise = _identity_exercise()
    verdict = judged(exercise, lambda x: object())
    assert not verdict.passed and "cannot read back" in verdict.feedback
    class Custom(Exception):
        pass

    def raises(x):
        raise Custom("nope")
    verdict = judged(exercise, raises)
    assert verdict.feedback.startswith("your code raised Custom: nope"), verdict.feedback
    verdict = judged(exercise, lambda x: x.clone() if x.sum() < 0 else 1 / 0)
    assert "ZeroDivisionError" in verdict.feedback


def test_gradients_through_a_returned_tensor_are_replayed():
    def check_scale(fn):
        w = torch.randn(3, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        out = fn(w)
        out.sum().backward()
        expect(w.grad, torch.full((3,), 2.0), what="gradient")
        return "ok"
    exercise = Exercise("99.2", "double", ("double",), check_scale)
    assert judged(exercise, lambda w: 2 * w).passed
    wrong = judged(exercise, lambda w: 3 * w)
    assert not wrong.passed and "gradient" in wrong.feedback
    with pytest.raises(CheckFailed):
        raise CheckFailed("x")
