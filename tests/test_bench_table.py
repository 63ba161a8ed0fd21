"""The README's performance table is generated from the newest `course-bench all` run per device in
benchmarks/raw/ (`python -m course_lib.bench.table`), and stays in step with it. The generator is tested on
synthetic runs whose ratios are worked out by hand here, one of them with a failed benchmark."""

import json

import pytest

from course_lib.bench import BENCHMARKS
from course_lib.bench.table import (HEADLINES, RAW_DIR, README_END, README_START, all_runs, latest_runs, main,
                                    readme_table, update_readme)


def _results() -> dict:
    """One result per benchmark, shaped as each benchmark returns it, with round numbers."""
    return {
        "lora": {"shape": "embedded", "dtype": "torch.float32", "batch": "8x256", "train_step_s": [0.030, 0.040],
                 "mixed_serve_s": [0.010, 0.020], "peak_mb": None},
        "sft": {"rows": 160, "run_s": {"course_lib": 3.0, "trl_packed": 4.0, "trl_defaults": 6.0},
                "settings": {"trl_defaults": "bfloat16 autocast, checkpointing on, padded"}},
        "nf4": {"rows": [{"shape": [4, 8], "us": [100.0, 50.0], "dq_us": [300.0, 100.0]},
                         {"shape": [8, 4], "us": [300.0, 150.0], "dq_us": [100.0, 100.0]}]},
        "qlora": {"shape": "embedded", "dtype": "torch.float32", "batch": "4x128", "rows": [
            {"kind": "LoRA (course_lib)", "checkpointing": False, "step_s": 0.1, "peak_gib": None},
            {"kind": "QLoRA (course_lib)", "checkpointing": False, "step_s": 0.3, "peak_gib": None},
            {"kind": "QLoRA (bitsandbytes + peft)", "checkpointing": False, "step_s": 0.6, "peak_gib": None},
            {"kind": "QLoRA (course_lib)", "checkpointing": True, "step_s": 0.4, "peak_gib": None},
            {"kind": "QLoRA (bitsandbytes + peft)", "checkpointing": True, "step_s": 0.5, "peak_gib": None}]},
        "grpo": {"step_s": {"course_lib": 1.0, "course_lib_concatenated": 1.5, "trl_defaults": 4.0, "trl_float32": 2.0},
                 "trl_settings": {"defaults": "bfloat16 autocast, checkpointing on"}, "generation_s": [0.5, 1.0],
                 "generation_s_concatenated": 0.8},
    }


def _run(date: str, device_type: str = "cpu", **overrides) -> dict:
    benchmarks = {name: {"result": result, "seconds": 1.0} for name, result in _results().items()}
    benchmarks["dpo"] = {"error": "RuntimeError: boom | with a pipe\nand a line break", "seconds": 0.5}
    machine = {"device": "cpu" if device_type == "cpu" else "NVIDIA H200", "device_type": device_type, "cpu_count": 2,
               "cpu_model": "Test CPU", "versions": {"torch": "2.0", "trl": "1.0", "bitsandbytes": None},
               "load_average": [3.31, 2.0, 1.0]}
    if device_type == "cuda":
        machine["gpu"] = "NVIDIA H200"
    return {"command": "all", "arguments": {"repeats": 3}, "date": date, "machine": machine, "note": None,
            "benchmarks": benchmarks, **overrides}


def _rows(table: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith(("| benchmark", "| ---"))]


def test_every_benchmark_has_a_headline():
    assert set(HEADLINES) == set(BENCHMARKS)


def test_the_table_has_each_headline_then_its_defaults_row_and_marks_a_failure(tmp_path):
    (tmp_path / "2026-12-01-cpu.json").write_text(json.dumps(_run("2026-12-01T10:00:00+00:00")))
    table = readme_table(tmp_path)
    rows = _rows(table)
    by_benchmark = {}
    for row in rows:
        by_benchmark.setdefault(row[0], []).append(row)
    assert list(by_benchmark) == ["lora", "sft", "nf4", "qlora", "grpo", "dpo"]  # the run's order
    # course_lib ÷ library, by hand: 30/40 ms, 10/20 ms; 3/4 s, 3/6 s; (100+300)/(50+150) µs, (300+100)/(100+100)
    assert [r[4] for r in by_benchmark["lora"]] == ["**0.75×**", "**0.50×**"]
    assert by_benchmark["lora"][0][2:4] == ["30 ms", "40 ms"]
    assert [r[4] for r in by_benchmark["sft"]] == ["**0.75×**", "**0.50×**"]
    assert "both packed" in by_benchmark["sft"][0][1] and "defaults row" in by_benchmark["sft"][1][1]
    assert [r[4] for r in by_benchmark["nf4"]] == ["**2.00×**", "**2.00×**"]
    assert by_benchmark["nf4"][0][2:4] == ["400 µs", "200 µs"]
    # QLoRA: course_lib's against bitsandbytes + peft's at the same checkpointing (not against LoRA): 0.3/0.6, 0.4/0.5
    assert [r[4] for r in by_benchmark["qlora"]] == ["**0.50×**", "**0.80×**"]
    assert "both with checkpointing off" in by_benchmark["qlora"][0][1]
    assert "both with checkpointing on" in by_benchmark["qlora"][1][1]
    # GRPO: the same work first (course_lib without prefix sharing vs TRL float32: 1.5/2), course_lib's prefix
    # sharing vs the same (1/2), defaults against defaults (1/4); generation the same way (0.8/1, 0.5/1)
    assert [r[4] for r in by_benchmark["grpo"]] == ["**0.75×**", "**0.50×**", "**0.25×**", "**0.80×**", "**0.50×**"]
    assert "same work: both float32" in by_benchmark["grpo"][0][1] and "prefix sharing" in by_benchmark["grpo"][1][1]
    assert "checkpointing on" in by_benchmark["grpo"][2][1] and "defaults row" in by_benchmark["grpo"][2][1]
    # The failure: its error in one cell (no pipe, no line break), no figures
    (failed,) = by_benchmark["dpo"]
    assert failed[1] == "failed: RuntimeError: boom / with a pipe and a line break" and failed[2:5] == ["—"] * 3
    for row in rows:
        assert len(row) == 7 and row[5] == "CPU, 2 cores, load 3.3" and row[6] == "2026-12-01"
    (note,) = [line for line in table.splitlines() if line.startswith("- ")]
    assert "`2026-12-01-cpu.json`" in note and "`course-bench all --device cpu --repeats 3`" in note
    assert "Test CPU" in note and "torch 2.0, trl 1.0." in note and "bitsandbytes" not in note  # not installed there


def test_the_newest_all_run_per_device_type_is_the_one_shown(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(_run("2026-12-01T10:00:00+00:00")))
    (tmp_path / "b.json").write_text(json.dumps(_run("2026-12-02T09:00:00+00:00")))
    (tmp_path / "c.json").write_text(json.dumps(_run("2026-11-30T09:00:00+00:00", "cuda")))
    (tmp_path / "d.json").write_text(json.dumps(_run("2026-12-03T09:00:00+00:00", command="lora")))  # one benchmark
    (tmp_path / "old_format.json").write_text(json.dumps({"device": "NVIDIA H100", "rows": []}))  # not a run record
    assert [run["path"] for run in all_runs(tmp_path)] == ["c.json", "a.json", "b.json"]
    assert [run["path"] for run in latest_runs(tmp_path)] == ["b.json", "c.json"]  # cpu, then cuda
    dates = {row[6] for row in _rows(readme_table(tmp_path))}
    assert dates == {"2026-12-02", "2026-11-30"}
    assert {row[5] for row in _rows(readme_table(tmp_path)) if row[6] == "2026-11-30"} == {"NVIDIA H200"}


def test_no_runs_says_how_to_make_one(tmp_path):
    assert "run `course-bench all`" in readme_table(tmp_path)


def test_update_readme_writes_between_the_markers_only_and_check_reports_staleness(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "run.json").write_text(json.dumps(_run("2026-12-01T10:00:00+00:00")))
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n{README_START}\nold table\n{README_END}\nafter\n")
    assert update_readme(readme, raw, check=True) is False  # stale
    assert update_readme(readme, raw) is True
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n") and text.endswith(f"{README_END}\nafter\n")
    assert "old table" not in text and "| lora |" in text
    assert update_readme(readme, raw, check=True) is True  # now current
    readme.write_text("no markers here\n")
    with pytest.raises(ValueError, match="no <!-- bench:start --> ... <!-- bench:end --> markers"):
        update_readme(readme, raw)


def test_the_readme_table_is_the_one_the_latest_results_give():
    """Fails when benchmarks/raw/ has a newer `course-bench all` run than the README shows: rerun
    `python -m course_lib.bench.table`."""
    assert latest_runs(RAW_DIR), "benchmarks/raw/ holds no `course-bench all` run"
    assert main(["--check"]) == 0, "README.md's performance table is stale: run `python -m course_lib.bench.table`"


def test_results_from_before_prefix_sharing_give_the_equal_work_row_and_the_defaults_row():
    from course_lib.bench.table import dpo_rows

    rows = dpo_rows({"step_s": {"course_lib": 1.0, "trl_defaults": 5.0, "trl_float32": 2.0},
                     "trl_settings": {"defaults": "bfloat16 autocast, checkpointing on"}})
    assert [round(r["ratio"], 3) for r in rows] == [0.5, 0.2]


def test_the_shared_prompt_row_says_the_spread_of_its_rounds_when_the_run_has_them():
    result = dict(_results()["grpo"])
    assert "rounds" not in HEADLINES["grpo"](result)[1]["what"]  # runs from before the spread was kept
    result["step_ratio_rounds"] = {"float32": [0.44, 0.47, 0.51], "defaults": [0.2, 0.3, 0.4]}
    shared = HEADLINES["dpo"](result)[1]
    assert shared["what"].endswith("vs the same TRL; 3 rounds 0.44–0.51×") and shared["ratio"] == 0.5
