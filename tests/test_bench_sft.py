"""`course-bench sft` runs on a CPU (one repeat) and compares like with like: course_lib and TRL packed, in
float32 without checkpointing, train the very same tokens in one pass; TRL's defaults row runs as it ships."""

import argparse
import math

import pytest


@pytest.mark.slow
def test_sft_benchmark_trains_the_same_tokens_on_every_side(capsys):
    from course_lib.bench import bench_sft

    result = bench_sft(argparse.Namespace(repeats=1, device="cpu"))
    assert set(result["run_s"]) == {"course_lib", "trl_packed", "trl_defaults"}
    for name, ratio in result["ratio"].items():
        assert math.isclose(ratio, result["run_s"]["course_lib"] / result["run_s"][f"trl_{name}"])
    tokens = result["trained_tokens"]
    assert tokens["course_lib"] > 0 and tokens["course_lib"] == tokens["trl_packed"] == tokens["trl_defaults"]
    assert 1 <= result["optimizer_steps"]["trl_packed"] <= result["optimizer_steps"]["course_lib"] == 10
    settings = result["settings"]
    assert settings["trl_packed"].startswith("no autocast (float32), checkpointing off, bfd packing")
    assert settings["trl_defaults"].startswith("bfloat16 autocast, checkpointing on")  # SFTConfig's defaults, applied
    assert settings["course_lib"].startswith("float32, checkpointing off")
    assert "TRL SFTTrainer, packed" in capsys.readouterr().out
