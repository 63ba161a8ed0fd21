"""Run a notebook top to bottom in a fresh Jupyter kernel: the one helper `course-lab`,
`course-grade` and ``python -m course_lib.build --execute`` share.

Every run gets the same kernel (``python3``, this interpreter's), starts in the notebook's own
folder (so relative paths in a lesson mean what they say), and imports the same ``course_lib`` as
the process that started it: the folder holding this package goes first on the kernel's
``PYTHONPATH``, which matters where course_lib is not pip-installed (the GPU image). The callers
differ only in how they treat trouble — the lab stops at the first error, the grader lets every
cell run and interrupts a cell that runs over its time — and say so with the keyword arguments.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

PACKAGE_PARENT = Path(__file__).resolve().parent.parent  # the folder that holds course_lib/
KERNEL_NAME = "python3"
# What a cell that ran over its time shows when it is interrupted instead of ending the run.
TIMEOUT_ERROR = {"ename": "TimeoutError", "evalue": "", "traceback": []}


def kernel_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The kernel's environment: ``environ`` (default: this process's) with :data:`PACKAGE_PARENT`
    first on ``PYTHONPATH`` and no duplicate entries. The runner's own environment is left alone."""
    env = dict(os.environ if environ is None else environ)
    parts = [str(PACKAGE_PARENT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    return env


def execute_notebook(nb, cwd: str | os.PathLike, *, cell_timeout: float,
                     timeout_for: Callable[[object], int] | None = None, allow_errors: bool = False,
                     interrupt_on_timeout: bool = False, record_timing: bool = True,
                     on_cell_execute: Callable[[object, int], None] | None = None):
    """Execute ``nb`` (an nbformat notebook, changed in place: outputs are filled in) and return it.

    ``cwd``: the folder the kernel starts in (the notebook's). ``cell_timeout``: seconds per cell;
    ``timeout_for(cell)`` overrides it cell by cell. ``allow_errors``: keep going after a cell raises
    (its error stays in its outputs) instead of raising ``CellExecutionError``.
    ``interrupt_on_timeout``: interrupt a cell that runs over its time, record a ``TimeoutError``
    output and go on, instead of raising ``CellTimeoutError``. ``record_timing``: store each cell's
    start and end times in its metadata (nbclient's default). ``on_cell_execute(cell, index)``: called
    just before each code cell is sent to the kernel. A kernel that dies raises nbclient's
    ``DeadKernelError`` in every mode.
    """
    from nbclient import NotebookClient

    if cell_timeout is None or cell_timeout <= 0:
        raise ValueError(f"cell_timeout={cell_timeout!r}: give the seconds a cell may run, a positive number")
    import shutil
    import tempfile

    from traitlets.config import Config

    # The kernel talks to us over local IPC sockets in a private folder, not TCP on localhost: nothing
    # else on the machine can connect, and Jupyter has no "running over TCP without encryption" to warn of.
    sockets = Path(tempfile.mkdtemp(prefix="course-kernel-"))
    config = Config()
    config.KernelManager.transport = "ipc"
    config.KernelManager.ip = str(sockets / "kernel")
    client = NotebookClient(
        nb, timeout=max(1, int(cell_timeout)), timeout_func=timeout_for, kernel_name=KERNEL_NAME,
        allow_errors=allow_errors, interrupt_on_timeout=interrupt_on_timeout,
        error_on_timeout=TIMEOUT_ERROR if interrupt_on_timeout else None, record_timing=record_timing,
        resources={"metadata": {"path": str(Path(cwd).resolve())}}, config=config)
    if on_cell_execute is not None:
        client.on_cell_execute = lambda cell, cell_index: on_cell_execute(cell, cell_index)
    # nbclient takes SIGINT/SIGTERM itself while a notebook runs: it only shuts the kernel down, and what
    # follows is a dead-kernel error, an AssertionError or even a normal return. Its handler leaves
    # `_async_cleanup_kernel_future` behind; seeing it, stop the caller as Ctrl-C would.
    def interrupted() -> bool:
        return getattr(client, "_async_cleanup_kernel_future", None) is not None

    try:
        result = client.execute(env=kernel_env())
    except BaseException:
        if interrupted():
            raise KeyboardInterrupt("interrupted (SIGINT/SIGTERM) while a notebook ran") from None
        raise
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
    if interrupted():
        raise KeyboardInterrupt("interrupted (SIGINT/SIGTERM) while a notebook ran")
    return result
