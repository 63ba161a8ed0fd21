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
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

PACKAGE_PARENT = Path(__file__).resolve().parent.parent  # the folder that holds course_lib/
KERNEL_NAME = "python3"
# What a cell that ran over its time shows when it is interrupted instead of ending the run.
TIMEOUT_ERROR = {"ename": "TimeoutError", "evalue": "", "traceback": []}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM (``kill``, a cancelled CI job) stopped the run; ``signum`` says which.
    A KeyboardInterrupt, so code that handles Ctrl-C handles both. ``exit_code`` is the shell's convention
    for a process ended by a signal: 128 + its number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# Signals received while stop_signals_raise_interrupted() is in force. The KeyboardInterrupt a handler raises
# can be swallowed by code that catches everything (numpy's import inside torch's, in C, does): what was
# received is kept here, so that raise_if_interrupted() can raise it again at the next safe point.
_received: list[int] = []


def _raise_interrupted(signum, frame):
    _received.append(signum)
    raise Interrupted(signum)


def raise_if_interrupted() -> None:
    """Raise :class:`Interrupted` again if a stop signal has been received (see :data:`_received`)."""
    if _received:
        raise Interrupted(_received[0])


@contextmanager
def stop_signals_raise_interrupted():
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (SIGTERM's default
    would end the process on the spot, skipping every cleanup: a kernel left running, a worker orphaned).
    The previous handlers come back afterwards. Does nothing outside the main thread, where Python cannot
    install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received.clear()


def _interruptible_client_class():
    """nbclient's NotebookClient, with SIGINT/SIGTERM taken over while a notebook runs.

    nbclient installs its own handlers on its event loop for the whole run; they only schedule a graceful
    kernel shutdown, after which the run ends however it happens to (a dead-kernel error, an
    AssertionError from its second cleanup, even a normal return), the signal's number is lost, and the
    runner's own handlers are replaced by the defaults when the run ends. Here the same loop handlers
    instead note the signal, make the shutdown immediate (the kernel's process group is killed, so a cell
    stuck in ``time.sleep`` or native code does not delay it) and cancel the run, whose cleanup then
    shuts the kernel down before :func:`execute_notebook` raises :class:`Interrupted`."""
    import asyncio
    import atexit

    from nbclient import NotebookClient

    class InterruptibleClient(NotebookClient):
        interrupted_by: int | None = None

        def _take_stop_signals(self) -> None:
            loop, run = asyncio.get_running_loop(), asyncio.current_task()
            for signum in STOP_SIGNALS:
                try:  # replaces nbclient's handler, installed just before the kernel starts
                    loop.add_signal_handler(signum, self._on_stop_signal, signum, run)
                except (RuntimeError, ValueError, NotImplementedError):
                    return  # not the main thread (a loop already running) or no signals: nbclient's way

        def _on_stop_signal(self, signum: int, run) -> None:
            if self.interrupted_by is None:  # a second signal changes nothing: the first is being acted on
                self.interrupted_by = signum
                self.shutdown_kernel = "immediate"
                if run is not None:
                    run.cancel()

        async def _cleanup_if_interrupted(self, starting) -> None:
            # nbclient starts the kernel and its client before its own try/finally that shuts the kernel
            # down: a run cancelled while either starts must shut down whatever already runs itself.
            try:
                await starting
            except (asyncio.CancelledError, KeyboardInterrupt):
                if self.km is not None:
                    self.shutdown_kernel = "immediate"
                    await self._async_cleanup_kernel()
                    atexit.unregister(self._cleanup_kernel)  # nothing left for nbclient's exit hook to do
                raise

        async def async_start_new_kernel(self, **kwargs) -> None:
            self._take_stop_signals()
            await self._cleanup_if_interrupted(super().async_start_new_kernel(**kwargs))

        async def async_start_new_kernel_client(self):
            await self._cleanup_if_interrupted(super().async_start_new_kernel_client())
            return self.kc

    return InterruptibleClient


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
    if cell_timeout is None or cell_timeout <= 0:
        raise ValueError(f"cell_timeout={cell_timeout!r}: give the seconds a cell may run, a positive number")
    raise_if_interrupted()  # a signal whose KeyboardInterrupt was swallowed on the way: start no kernel
    import shutil
    import tempfile

    from traitlets.config import Config

    # The kernel talks to us over local IPC sockets in a private folder, not TCP on localhost: nothing
    # else on the machine can connect, and Jupyter has no "running over TCP without encryption" to warn of.
    sockets = Path(tempfile.mkdtemp(prefix="course-kernel-"))
    config = Config()
    config.KernelManager.transport = "ipc"
    config.KernelManager.ip = str(sockets / "kernel")
    client = _interruptible_client_class()(
        nb, timeout=max(1, int(cell_timeout)), timeout_func=timeout_for, kernel_name=KERNEL_NAME,
        allow_errors=allow_errors, interrupt_on_timeout=interrupt_on_timeout,
        error_on_timeout=TIMEOUT_ERROR if interrupt_on_timeout else None, record_timing=record_timing,
        resources={"metadata": {"path": str(Path(cwd).resolve())}}, config=config)
    if on_cell_execute is not None:
        client.on_cell_execute = lambda cell, cell_index: on_cell_execute(cell, cell_index)
    # While the notebook runs, SIGINT/SIGTERM are the client's (see _interruptible_client_class); nbclient's
    # own handler, had it run instead, leaves `_async_cleanup_kernel_future` behind. Either way the caller
    # is stopped as Ctrl-C would, and this process's own handlers, which the event loop resets to the
    # defaults when it lets go of the signals, are put back.
    def interruption() -> Interrupted | None:
        if client.interrupted_by is not None:
            return Interrupted(client.interrupted_by, f"interrupted by {signal.Signals(client.interrupted_by).name} "
                                                      f"while a notebook ran; its kernel was shut down")
        if getattr(client, "_async_cleanup_kernel_future", None) is not None:
            return Interrupted(signal.SIGINT, "interrupted (SIGINT/SIGTERM) while a notebook ran")
        return None

    in_main_thread = threading.current_thread() is threading.main_thread()
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS} if in_main_thread else {}
    try:
        result = client.execute(env=kernel_env())
    except BaseException:
        if (stopped := interruption()) is not None:
            raise stopped from None
        raise
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
        for signum, handler in handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
    if (stopped := interruption()) is not None:
        raise stopped
    return result
