"""Interrupting course-grade (issue 14), one submission and a class batch (``--jobs 2`` with both gradebooks):
Ctrl-C (SIGINT to the whole foreground process group, as a terminal sends it) and ``kill`` (SIGTERM to
course-grade alone) stop it within STOP_BOUND seconds, with exit code 128 + the signal (130, 143), a message
saying what happened and no traceback; every process it started (workers, kernels) is gone, no temporary
file or folder is left behind, and no gradebook is written: an earlier run's complete gradebook stays as it
was, and none appears where there was none.

Each submission is lesson 06's solution with one added cell that marks a file and sleeps for a minute; the
signal is sent once every submission's kernel is inside that cell."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import threading

import nbformat
import psutil
import pytest

from course_lib.notebook_run import Interrupted, raise_if_interrupted, stop_signals_raise_interrupted

from .conftest import ROOT

SOLUTION = ROOT / "solutions" / "06_rlhf_ppo.ipynb"
STOP_BOUND = 15  # seconds from the signal to course-grade's exit (measured 0.5-7 s, 6 sessions sharing 2 cores)
START_BOUND = 150  # seconds for course-grade and its kernels to reach the sleeping cell on a busy machine


def _sleeping_submission(folder: Path, name: str, marker: Path) -> Path:
    nb = nbformat.read(SOLUTION, as_version=4)
    nb.cells.insert(1, nbformat.v4.new_code_cell(
        f"import pathlib, time\npathlib.Path({str(marker)!r}).touch()\ntime.sleep(60)"))
    path = folder / name
    nbformat.write(nb, path)
    return path


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _is_kernel(process: psutil.Process) -> bool:
    try:
        return "ipykernel" in " ".join(process.cmdline())
    except psutil.Error:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("batch", [False, True], ids=["one submission", "batch --jobs 2"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_an_interrupted_grading_stops_promptly_and_leaves_no_kernel_no_gradebook(tmp_path, signum, batch):
    names = ["06_ada.ipynb", "06_bob.ipynb"] if batch else ["06_ada.ipynb"]
    markers = [tmp_path / f"{name}.running" for name in names]
    submissions = [_sleeping_submission(tmp_path, name, marker) for name, marker in zip(names, markers)]
    csv_path, json_path = tmp_path / "book.csv", tmp_path / "book.json"
    earlier = json.dumps({"submissions": [], "note": "an earlier, complete run"})
    json_path.write_text(earlier)
    command = [sys.executable, "-m", "course_lib.grading.runner", *map(str, submissions)]
    if batch:
        command += ["--jobs", "2", "--csv", str(csv_path), "--gradebook-json", str(json_path)]
    own_tmp = Path(tempfile.mkdtemp(prefix="cg-"))  # short: it holds the kernels' IPC sockets
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TMPDIR": str(own_tmp)}
    grader = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)  # its own process group, as in a terminal
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + START_BOUND
        while not all(m.exists() for m in markers) and time.monotonic() < deadline and grader.poll() is None:
            time.sleep(0.2)
        assert all(m.exists() for m in markers), f"the sleeping cells never ran: {grader.communicate()[1][-3000:]}"
        started = psutil.Process(grader.pid).children(recursive=True)
        kernels = [p for p in started if _is_kernel(p)]
        assert len(kernels) == len(names), [p.cmdline() for p in started]
        time.sleep(0.5)
        signalled = time.monotonic()
        if signum == signal.SIGINT:
            os.killpg(grader.pid, signal.SIGINT)  # Ctrl-C reaches every process in the foreground group
        else:
            grader.send_signal(signal.SIGTERM)  # `kill PID`: course-grade alone
        stdout, stderr = grader.communicate(timeout=60)
        took = time.monotonic() - signalled
    finally:
        if grader.poll() is None:
            grader.kill()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in started if _alive(p)]
        for process in left:  # clean up before failing
            process.kill()
    assert not left, f"process(es) outlived the interrupted course-grade: {[p.cmdline()[:4] for p in left]}"
    assert took < STOP_BOUND, f"course-grade took {took:.1f} s to stop"
    assert grader.returncode == 128 + signum, (grader.returncode, stderr[-3000:])
    name = signal.Signals(signum).name
    assert f"course-grade: interrupted by {name}" in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert "Score:" not in stdout and "/7" not in stdout, stdout
    if batch:
        assert "0 of 2 submission(s) graded, 2 stopped (with any kernel they had started)" in stderr, stderr
        assert "no gradebook written" in stderr and "from an earlier, complete run" in stderr, stderr
        assert not csv_path.exists() and json_path.read_text() == earlier
    else:
        assert "no score given" in stderr, stderr
    assert not list(tmp_path.glob("*.partial"))
    leftovers = sorted(p.name for p in own_tmp.iterdir())
    assert not leftovers, f"temporary files left behind: {leftovers}"  # recordings, kernel sockets


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals reach the main thread")
def test_a_stop_signal_is_raised_again_after_code_swallowed_its_keyboard_interrupt():
    """Code that catches everything (numpy's import inside torch's does, in C) can swallow the KeyboardInterrupt
    a signal raises: course-grade keeps the signal and raises it again before it starts a kernel or reports."""
    before = signal.getsignal(signal.SIGTERM)
    with stop_signals_raise_interrupted():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in here
        except BaseException:  # swallowed
            pass
        with pytest.raises(Interrupted) as stopped:
            raise_if_interrupted()
    assert stopped.value.signum == signal.SIGTERM and stopped.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back
    raise_if_interrupted()  # and nothing is left pending for the next run
