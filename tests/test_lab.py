import math
import re
import subprocess

import nbformat
import pytest
import torch

from course_lib.lab import SYLLABUS, format_table, inject_parameters, lesson_notebooks, run_notebook


def run_cli(*args):
    return subprocess.run(["course-lab", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, message", [
    (["--only", "99"], "there is no lesson 99"),
    (["--model", "./no/such/model"], "no such folder"),
])
def test_bad_arguments_are_one_line_errors(args, message):
    out = run_cli(*args)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_planned_lesson_is_named_and_refused(monkeypatch):
    """Every lesson exists now (09 included), so a planned one is simulated: its number and title, and what is
    available instead."""
    from course_lib import lab

    available = {k: v for k, v in lab.lesson_notebooks().items() if k != "09"}
    monkeypatch.setattr(lab, "lesson_notebooks", lambda: available)
    with pytest.raises(ValueError, match=re.escape(f"lesson 09 ({lab.SYLLABUS['09']}) is planned, not available yet")):
        lab.parse_only("09")


def test_no_notebooks_to_run_is_an_error_that_says_where_it_looked(tmp_path, monkeypatch, capsys):
    """A non-editable install has no notebooks/ beside the package: say so instead of running nothing."""
    from course_lib import lab

    monkeypatch.setattr(lab, "NOTEBOOKS", tmp_path / "notebooks")
    assert lab.main([]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "notebooks") in err and "pip install -e ." in err, err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="no lesson notebooks"):
        lab.run_lab(out_dir=tmp_path / "out")


def test_gpu_profile_without_gpu_is_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU, so the gpu profile is valid")
    out = run_cli("--profile", "gpu", "--only", "00")
    assert out.returncode == 2 and "needs a CUDA GPU" in out.stderr


def test_syllabus_has_ten_lessons_and_available_ones_exist():
    assert list(SYLLABUS) == [f"{i:02d}" for i in range(10)]
    assert "00" in lesson_notebooks()


def _lab_notebook(tmp_path, tagged=True):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('PROFILE = "cpu"\nMODEL = None\nMETRICS_PATH = None',
                                  metadata={"tags": ["parameters"] if tagged else []}),
        nbformat.v4.new_code_cell("from course_lib.lab import record_metrics\n"
                                  "record_metrics(METRICS_PATH, headline=f'model={MODEL}', value=42)"),
    ])
    path = tmp_path / "00_demo.ipynb"
    nbformat.write(nb, path)
    return path


def test_parameters_are_injected_and_metrics_collected(tmp_path, monkeypatch):
    """Through `run_lab`, on a one-lesson course whose notebook also shows a figure: the result, the executed
    notebook, and report.html with the lesson's headline and that figure; a previous run's report.html is
    gone as soon as a run starts."""
    import base64

    from course_lib import lab

    from .test_lab_report import tiny_png

    path = _lab_notebook(tmp_path)
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(f"from IPython.display import Image\nImage(data={tiny_png()!r})"))
    nbformat.write(nb, path)
    monkeypatch.setattr(lab, "NOTEBOOKS", tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.html").write_text("a previous run's report")

    def interrupted(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(lab, "run_notebook", interrupted)
        lab.run_lab(out_dir=out)
    assert not (out / "report.html").exists()  # an interrupted run leaves no report to pass for its own
    [result] = lab.run_lab(model="some/model", out_dir=out, cell_timeout=60)
    assert result.status == "ok", result
    page = (out / "report.html").read_text()
    assert "model=some/model" in page and f"data:image/png;base64,{base64.b64encode(tiny_png()).decode()}" in page
    assert result.headline == "model=some/model" and result.metrics == {"value": 42}
    executed = nbformat.read(out / "00_demo.ipynb", as_version=4)
    assert "injected-parameters" in executed.cells[1].metadata.tags
    table = format_table([result])
    assert "00_demo.ipynb" in table and "model=some/model" in table


def test_a_failing_notebook_is_reported_without_stale_outputs(tmp_path):
    path = _lab_notebook(tmp_path)
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(1, nbformat.v4.new_code_cell("raise RuntimeError('boom')"))
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", text="an output from an earlier run\n")]
    nbformat.write(nb, path)
    out = tmp_path / "out"
    out.mkdir()
    result = run_notebook(path, out, {"PROFILE": "cpu", "MODEL": None}, 60)
    assert result.status == "error" and "RuntimeError: boom" in result.detail
    executed = nbformat.read(out / path.name, as_version=4)
    assert executed.cells[-1].outputs == []  # never ran this time, so it shows nothing


def test_untagged_notebook_is_a_clear_error(tmp_path):
    nb = nbformat.read(_lab_notebook(tmp_path, tagged=False), as_version=4)
    with pytest.raises(ValueError, match="no cell tagged 'parameters'"):
        inject_parameters(nb, {"PROFILE": "cpu"})


def test_bench_cli_lists_benchmarks_and_rejects_unknown_names():
    out = subprocess.run(["course-bench"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "benchmarks: lora, sft, nf4, qlora, dpo" in out.stdout
    out = subprocess.run(["course-bench", "dpo2"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no benchmark 'dpo2'" in out.stderr and "available: lora, sft, nf4, qlora, dpo" in out.stderr


@pytest.mark.slow
def test_dpo_benchmark_runs_on_cpu():
    """One tiny round of `course-bench dpo`: course_lib's step and TRL's DPOTrainer step on the same pairs."""
    import argparse

    from course_lib.bench import bench_dpo

    result = bench_dpo(argparse.Namespace(repeats=1, steps=1))
    assert set(result["step_ratio"]) == {"defaults", "float32"}  # TRL as shipped, and in our arithmetic
    for variant, ratio in result["step_ratio"].items():
        assert ratio > 0 and math.isclose(ratio, result["step_s"]["course_lib"] / result["step_s"][f"trl_{variant}"])
        assert result["step_ratio_rounds"][variant] == [ratio]  # one round: its ratio is the median's


def test_qlora_benchmark_runs_on_cpu_and_reports_every_variant(capsys):
    """The GPU machine is lent for minutes: its benchmarks' shared code must not fail there first."""
    import argparse

    from course_lib.bench import bench_qlora

    result = bench_qlora(argparse.Namespace(repeats=1))
    kinds = {(row["kind"], row["checkpointing"]) for row in result["rows"]}
    assert kinds == {(k, c) for k in ("LoRA (course_lib)", "QLoRA (course_lib)", "QLoRA (bitsandbytes + peft)")
                     for c in (False, True)}
    assert all(row["step_s"] > 0 for row in result["rows"])
    assert "QLoRA (bitsandbytes + peft)" in capsys.readouterr().out


def test_a_lesson_record_is_kept_for_later_lessons(tmp_path, monkeypatch):
    from course_lib.lab import record_metrics, recorded_metrics

    monkeypatch.setenv("COURSE_LIB_RUNS", str(tmp_path / "runs"))
    assert recorded_metrics("06") is None                      # never run here: later lessons must say so
    record_metrics(None, headline="first", lesson="06", seconds=1.5)
    record_metrics(None, headline="second", lesson="06", seconds=2.5, table={"a": 1})
    record_metrics(tmp_path / "07.json", headline="not kept")  # no lesson: only the path is written
    kept = recorded_metrics("06")
    assert kept["headline"] == "second" and kept["metrics"] == {"seconds": 2.5, "table": {"a": 1}}
    assert kept["lesson"] == "06" and kept["recorded"][:4].isdigit() and "CPUs" in kept["machine"]
    assert recorded_metrics("07") is None and sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["06.json"]


def test_cpu_profile_is_float32_on_every_cpu_and_bf16_is_opt_in(monkeypatch):
    """The committed numbers must reproduce on any CPU: the default cpu profile never autocasts, whatever the
    CPU's flags; cpu-bf16 autocasts where the CPU has fast bf16 and is refused, naming the fix, elsewhere."""
    from course_lib import profile

    for fast in (True, False):
        monkeypatch.setattr(profile, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert profile.get_profile("cpu").autocast_dtype is None
        if fast:
            assert profile.get_profile("cpu-bf16").autocast_dtype is torch.bfloat16
        else:
            with pytest.raises(RuntimeError, match="use profile 'cpu'"):
                profile.get_profile("cpu-bf16")


def test_bitsandbytes_hub_kernel_notice_is_dropped_and_other_warnings_pass(caplog):
    """The notice appears only on AVX-512 BF16 CPUs; emit it through the same logger to test the filter."""
    import logging

    import course_lib  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...", "x")
        logger.warning("a real problem")
    assert [r.getMessage() for r in caplog.records] == ["a real problem"]


def test_importing_course_lib_first_keeps_the_bitsandbytes_notice_out_of_a_fresh_process():
    """The order every notebook uses (tests/test_build.py checks it), in a fresh interpreter: on an AVX-512
    BF16 CPU importing peft / trl prints the notice unless course_lib's filter is already installed. On
    other CPUs bitsandbytes never emits it, so there this checks only that the imports stay quiet."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import course_lib, peft, trl"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "kernels-community" not in out.stdout + out.stderr
