"""`course-bench grpo` runs on a CPU: one tiny round (1 step, 1 repeat), course_lib's GRPO step and TRL's
GRPOTrainer step on the same prompts, G and completion length, then generation alone on both sides."""

import argparse
import math

import pytest


def test_grpo_benchmark_is_registered():
    from course_lib.bench import BENCHMARKS, bench_grpo

    assert BENCHMARKS["grpo"] is bench_grpo


@pytest.mark.slow
def test_grpo_benchmark_runs_on_cpu(capsys):
    from course_lib.bench import bench_grpo

    result = bench_grpo(argparse.Namespace(repeats=1, steps=1))
    assert {"step_s", "step_ratio", "generation_s", "generation_tokens", "generation_tokens_per_s", "steps",
            "prompts_per_step", "group_size", "max_completion_length", "beta", "loss_type"} <= set(result)
    assert result["steps"] == 1
    # course_lib (prompt shared by its G completions), course_lib with the prompt re-run per completion (TRL's
    # arithmetic), TRL as shipped, and TRL in float32
    assert set(result["step_s"]) == {"course_lib", "course_lib_concatenated", "trl_defaults", "trl_float32"}
    for seconds in (*result["step_s"].values(), *result["generation_s"]):
        assert seconds > 0 and math.isfinite(seconds)
    for variant, ratio in result["step_ratio"].items():
        assert math.isclose(ratio, result["step_s"]["course_lib"] / result["step_s"][f"trl_{variant}"])
        assert result["step_ratio_rounds"][variant] == [ratio]  # one round: its ratio is the median's
    # Every completion holds at least one token and at most max_completion_length, on both sides.
    rows = result["prompts_per_step"] * result["group_size"]
    for tokens in result["generation_tokens"]:
        assert rows <= tokens <= rows * result["max_completion_length"]
    assert all(rate > 0 and math.isfinite(rate) for rate in result["generation_tokens_per_s"])
    assert "TRL GRPOTrainer" in capsys.readouterr().out
