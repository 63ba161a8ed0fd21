"""Determinism (issue 14): two runs of the same lesson with the same seed on this CPU give the same
headline and the same metrics, timings aside. Lesson 04 (quantization, KL, a QLoRA run) is the quickest
lesson that trains."""

import re

import pytest

from course_lib.lab import lesson_notebooks, run_notebook

TIMING = re.compile(r"time|second|_ms$|^ms|latency|speed")


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not TIMING.search(str(k))}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


@pytest.mark.slow
def test_two_runs_of_a_lesson_give_the_same_headline_metrics(tmp_path):
    notebook = lesson_notebooks()["04"]
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        out.mkdir()
        result = run_notebook(notebook, out, {"PROFILE": "cpu", "MODEL": None}, cell_timeout=600)
        assert result.status == "ok", result.detail
        runs.append(result)
    assert runs[0].headline == runs[1].headline and runs[0].headline
    assert without_timings(runs[0].metrics) == without_timings(runs[1].metrics)
    assert without_timings(runs[0].metrics)["kl"]  # the comparison kept the measured numbers
