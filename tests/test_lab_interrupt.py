"""Interrupting course-lab (issue 14): SIGINT or SIGTERM while lesson 00 runs leaves no report.md /
report.json (not even a previous run's, which would pass for this one's), no half-written file, and no
kernel process left behind; the next run into the same folder works and writes a complete report."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import nbformat
import psutil
import pytest

from .conftest import ROOT

# course-lab on a folder holding one quick notebook instead of the lessons (the run after the interruption)
QUICK_LAB = textwrap.dedent("""
    import sys
    from pathlib import Path
    import course_lib.lab as lab
    lab.NOTEBOOKS = Path(sys.argv[1])
    sys.exit(lab.main(sys.argv[2:]))
""")


def _quick_notebooks(folder):
    folder.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('PROFILE = "cpu"\nMODEL = None\nMETRICS_PATH = None',
                                          metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("from course_lib.lab import record_metrics\n"
                                          "record_metrics(METRICS_PATH, headline='quick', value=1)")]
    nbformat.write(nb, folder / "00_quick.ipynb")
    return folder


def _kernels(process: psutil.Process) -> list[psutil.Process]:
    try:
        return [p for p in process.children(recursive=True) if "ipykernel" in " ".join(p.cmdline())]
    except psutil.Error:
        return []


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_leaves_no_report_and_no_kernel_and_the_next_run_works(tmp_path, signum):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    notebooks = _quick_notebooks(tmp_path / "notebooks")
    quick = [sys.executable, "-c", QUICK_LAB, str(notebooks), "--only", "00", "--out", str(out)]
    assert subprocess.run(quick, env=env, capture_output=True, text=True, timeout=120).returncode == 0
    assert (out / "report.md").exists()  # a complete earlier report, which the interrupted run must remove

    lab = subprocess.Popen([sys.executable, "-m", "course_lib.lab", "--only", "00", "--out", str(out)], cwd=ROOT,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        runner, deadline, kernels = psutil.Process(lab.pid), time.monotonic() + 90, []
        while not kernels and time.monotonic() < deadline and lab.poll() is None:
            time.sleep(0.2)
            kernels = _kernels(runner)
        assert kernels, "lesson 00's kernel never started"
        time.sleep(3)  # the kernel is running the lesson's cells
        lab.send_signal(signum)
        _, stderr = lab.communicate(timeout=60)
    finally:
        if lab.poll() is None:
            lab.kill()
    assert lab.returncode == 128 + signum, (lab.returncode, stderr[-2000:])  # 130 for SIGINT, 143 for SIGTERM
    assert "no report written" in stderr, stderr[-2000:]
    leftovers = sorted(p.name for p in out.iterdir())
    assert not {"report.md", "report.json", "report.html"} & set(leftovers), leftovers
    assert not [n for n in leftovers if n.endswith(".partial")], leftovers
    deadline = time.monotonic() + 15
    while any(_alive(k) for k in kernels) and time.monotonic() < deadline:
        time.sleep(0.2)
    orphans = [k.pid for k in kernels if _alive(k)]
    for pid in orphans:  # clean up before failing
        os.kill(pid, signal.SIGKILL)
    assert not orphans, f"kernel process(es) {orphans} outlived the interrupted course-lab"

    again = subprocess.run(quick, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert [r["status"] for r in report["results"]] == ["ok"] and "quick" in (out / "report.md").read_text()
