"""The hidden checks of every exercise: right answers pass, and a catalogue of plausible wrong
answers (tests/mistakes_lesson_NN.py, written independently of the checks' own diagnoses) fails
with feedback that names the mistake. Mutation score must be 100 % of the catalogue (DESIGN asks
≥ 90 %), with at least two named mistakes per exercise."""

import pytest

from course_lib.grading import check, exercises_for, find_exercise, run_exercise

from . import mistakes_lesson_00, mistakes_lesson_01, mistakes_lesson_02, mistakes_lesson_03, mistakes_lesson_04, mistakes_lesson_05, mistakes_lesson_06, mistakes_lesson_07, mistakes_lesson_08

LESSONS = {"00": mistakes_lesson_00, "01": mistakes_lesson_01, "02": mistakes_lesson_02, "03": mistakes_lesson_03, "04": mistakes_lesson_04, "05": mistakes_lesson_05, "06": mistakes_lesson_06, "07": mistakes_lesson_07, "08": mistakes_lesson_08}
RIGHT = {k: v for m in LESSONS.values() for k, v in m.RIGHT.items()}
CATALOGUE = [row for m in LESSONS.values() for row in m.CATALOGUE]
not_implemented, crashes = mistakes_lesson_00.not_implemented, mistakes_lesson_00.crashes
memory_ok, memory_no_overhead = mistakes_lesson_00.memory_ok, mistakes_lesson_00.memory_no_overhead


@pytest.mark.parametrize("exercise_id", sorted(RIGHT))
def test_right_answers_pass(exercise_id):
    result = run_exercise(find_exercise(exercise_id), [RIGHT[exercise_id]])
    assert result.passed, result.feedback


@pytest.mark.parametrize("exercise_id, wrong, phrase", CATALOGUE, ids=[w.__name__ for _, w, _ in CATALOGUE])
def test_plausible_mistakes_are_caught_and_named(exercise_id, wrong, phrase):
    result = run_exercise(find_exercise(exercise_id), [wrong])
    assert not result.passed
    assert phrase in result.feedback, result.feedback


@pytest.mark.parametrize("lesson", sorted(LESSONS))
def test_every_exercise_has_a_right_answer_and_at_least_two_named_mistakes(lesson):
    named = {}
    for exercise_id, _, phrase in LESSONS[lesson].CATALOGUE:
        named[exercise_id] = named.get(exercise_id, 0) + (phrase != "expected")
    assert {e.id for e in exercises_for(lesson)} == set(named) == set(LESSONS[lesson].RIGHT)
    assert min(named.values()) >= 2


@pytest.mark.parametrize("exercise_id", sorted(RIGHT))
def test_unimplemented_and_crashing_code_get_feedback_not_tracebacks(exercise_id):
    assert "not implemented yet" in run_exercise(find_exercise(exercise_id), [not_implemented]).feedback
    feedback = run_exercise(find_exercise(exercise_id), [crashes]).feedback
    assert feedback.startswith("your code raised ZeroDivisionError") and "1 / 0" in feedback


def test_inline_check_prints_on_success_and_raises_feedback_on_failure(capsys):
    check("00.2", memory_ok)
    assert "✓ Exercise 00.2" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="Exercise 00.2 .*1.2"):
        check("00.2", memory_no_overhead)
    with pytest.raises(TypeError, match="takes 1 object"):
        check("00.2")
