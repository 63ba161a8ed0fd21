"""Record in the learner's process, judge in the grader's: how ``course-grade`` keeps a verdict unforgeable.

A check (``course_lib.grading.lesson_NN``) calls the learner's functions on seeded inputs and compares
what comes back with the reference. ``course-grade`` runs every check twice:

1. **Record**, in the learner's kernel (:func:`record_in_kernel`): the check runs with each learner
   function wrapped in a :class:`_Recorder`, which writes down, call by call, what the function returned
   (or raised), how it changed its arguments in place, and the random-number state after it — as *data*
   only: tensors, numbers, strings, lists and dicts, saved with ``torch.save``. Whatever the check
   concludes there is thrown away: code in that process can replace any grading function.
2. **Judge**, in the grader's own process, which never runs learner code (:func:`judge`): the same check
   runs again, and each call of a learner function is answered by a :class:`_Replayer` from the
   recording, read with ``torch.load(weights_only=True)`` (no pickle of the learner's making is ever
   unpickled). Checks are deterministic given the random state, which the recording restores after
   each call, so the judge asks for exactly the calls the recording holds; it verifies that, digest by
   digest, and refuses a recording whose inputs differ from its own.

A recording can only make the judge pass by holding the right outputs for the judge's inputs, which is
what a correct function produces. Copying them from course_lib's reference is the one shortcut left: the
recorder notes every course_lib function the learner's code calls, and the verdict names them.

A check that must do more with a learner's object than call it and read data back (backpropagate through
its output, call methods of a class the learner wrote) wraps that part in :func:`in_sandbox`: the wrapped
function runs on the learner's side and its (data) result is recorded and replayed like a call.
"""

from __future__ import annotations

import builtins
import contextvars
import hashlib
import random
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

# Bound when course-grade imports this module, before any learner code runs: a cell that later replaces
# course_lib.grading's functions does not change what records the calls.
from . import CheckFailed, ExerciseResult, find_exercise, run_exercise

# None: run directly (a notebook's `check`, the tests); "record": in the learner's kernel; "replay": judge.
_MODE: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("course_grade_mode", default=None)
_COURSE_LIB = str(Path(__file__).resolve().parent.parent)
_GRADING = str(Path(__file__).resolve().parent)
MAX_EVENTS = 10_000


class ReplayMismatch(BaseException):
    """The recording does not answer the judge's call (a BaseException so no check can swallow it)."""


class NotData(TypeError):
    pass


class LearnerRaised(RuntimeError):
    """Stands in, in the judge, for an exception of a type the judge does not import."""


# ---------------------------------------------------------------------------------------------
# data: what may cross from the learner's process to the judge
# ---------------------------------------------------------------------------------------------
def to_data(value: Any, depth: int = 0):
    """``value`` as plain data ``torch.load(weights_only=True)`` can read, or :class:`NotData`."""
    if depth > 20:
        raise NotData("nested more than 20 levels deep")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return {"__tensor__": value.detach().cpu().clone(), "requires_grad": bool(value.requires_grad),
                "parameter": isinstance(value, nn.Parameter)}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, torch.Size):
        return {"__size__": list(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [to_data(v, depth + 1) for v in value]}
    if isinstance(value, list):
        return [to_data(v, depth + 1) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) for k in value):
            raise NotData("a dict whose keys are not all strings or integers")
        return {"__dict__": [[k, to_data(v, depth + 1)] for k, v in value.items()]}
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return {"__tensor__": torch.from_numpy(value.copy()), "requires_grad": False, "parameter": False}
    except ImportError:  # pragma: no cover
        pass
    raise NotData(f"a {type(value).__module__}.{type(value).__qualname__}")


def from_data(data: Any):
    if isinstance(data, list):
        return [from_data(v) for v in data]
    if not isinstance(data, dict):
        return data
    if "__tensor__" in data:
        t = data["__tensor__"]
        if data.get("parameter"):
            return nn.Parameter(t, requires_grad=data["requires_grad"])
        return t.requires_grad_(data["requires_grad"]) if t.is_floating_point() or t.is_complex() else t
    if "__dtype__" in data:
        return getattr(torch, data["__dtype__"])
    if "__size__" in data:
        return torch.Size(data["__size__"])
    if "__tuple__" in data:
        return tuple(from_data(v) for v in data["__tuple__"])
    if "__dict__" in data:
        return {k: from_data(v) for k, v in data["__dict__"]}
    raise ValueError("unreadable recording entry")


def digest(value: Any) -> str:
    """A fingerprint of a call's inputs that both processes compute alike (no ids or addresses)."""
    h = hashlib.sha256()
    _feed(h, value, 0)
    return h.hexdigest()[:16]


def _feed(h, value, depth):
    if depth > 12:
        h.update(b"...")
        return
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif value is None or isinstance(value, (bool, int, float, str, bytes, torch.dtype, torch.device)):
        h.update(repr(value).encode())
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for v in value:
            _feed(h, v, depth + 1)
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for k in sorted(value, key=repr):
            h.update(repr(k).encode())
            _feed(h, value[k], depth + 1)
    elif isinstance(value, nn.Module):
        h.update(type(value).__qualname__.encode())
        _feed(h, dict(value.state_dict()), depth + 1)
    elif isinstance(value, (_Recorder, _Replayer)):  # a learner's function passed on: the same on both sides
        h.update(f"learner:{value.name}".encode())
    elif hasattr(value, "to_dict") and callable(value.to_dict):  # transformers configs
        h.update(type(value).__qualname__.encode())
        _feed(h, value.to_dict(), depth + 1)
    else:
        h.update(type(value).__qualname__.encode())


# ---------------------------------------------------------------------------------------------
# in-place changes to arguments, and the random state
# ---------------------------------------------------------------------------------------------
def _stateful(args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    """(path, object) for each argument whose changes in place the judge must see."""
    found = []

    def walk(value, path, depth):
        if depth > 4:
            return
        if isinstance(value, torch.Tensor) or hasattr(value, "state_dict"):
            found.append((path, value))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]", depth + 1)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}[{k!r}]", depth + 1)

    for i, a in enumerate(args):
        walk(a, f"arg{i}", 0)
    for k, v in kwargs.items():
        walk(v, f"kw:{k}", 0)
    return found


def _state_of(obj) -> dict:
    """A tensor's value and gradient, or a module's / optimizer's / scheduler's state and gradients."""
    if isinstance(obj, torch.Tensor):
        return {"value": obj.detach().clone(), "grad": None if obj.grad is None else obj.grad.detach().clone()}
    state = {"state_dict": _cloned(obj.state_dict())}  # state_dict() shares the live tensors
    if isinstance(obj, nn.Module):
        state["grads"] = {n: p.grad.detach().clone() for n, p in obj.named_parameters() if p.grad is not None}
    return state


def _cloned(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _cloned(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cloned(v) for v in tree)
    return tree


def _changed(before: dict, obj) -> dict | None:
    after = _state_of(obj)
    return None if digest(before) == digest(after) else after


def _apply_state(obj, state: dict) -> None:
    with torch.no_grad():
        if isinstance(obj, torch.Tensor):
            value = state["value"]
            if obj.shape != value.shape:
                obj.data = value.clone()
            else:
                obj.copy_(value)
            obj.grad = state["grad"]
            return
        obj.load_state_dict(state["state_dict"])
        if isinstance(obj, nn.Module):
            grads = state.get("grads", {})
            for n, p in obj.named_parameters():
                p.grad = grads.get(n)


def rng_state() -> dict:
    import numpy as np

    return {"torch": torch.get_rng_state(), "python": repr(random.getstate()),
            "numpy": torch.from_numpy(np.random.get_state()[1].astype("int64"))}


def _set_rng(state: dict) -> None:
    import ast

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(ast.literal_eval(state["python"])))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype("uint32"), 624, 0, 0.0))


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _reset_rng(seed: int = 0) -> None:
    import numpy as np

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


# ---------------------------------------------------------------------------------------------
# the learner's side
# ---------------------------------------------------------------------------------------------
@contextmanager
def _watch_course_lib(calls: list[str]):
    """Collect the course_lib functions (outside grading/) that code run inside the block calls."""
    previous = sys.getprofile()

    def profile(frame, event, arg):
        if event == "call":
            filename = frame.f_code.co_filename
            if filename.startswith(_COURSE_LIB) and not filename.startswith(_GRADING) and len(calls) < 50:
                module = Path(filename).stem
                name = f"course_lib.{module}.{frame.f_code.co_qualname}"
                if name not in calls:
                    calls.append(name)

    sys.setprofile(profile)
    try:
        yield
    finally:
        sys.setprofile(previous)


class _Recorder:
    def __init__(self, name: str, fn: Callable, log: list, wrap_result: bool = True):
        self.name, self.fn, self.log = name, fn, log
        self.__name__ = getattr(fn, "__name__", name)
        self.__doc__ = getattr(fn, "__doc__", None)

    def __call__(self, *args, **kwargs):
        if len(self.log) >= MAX_EVENTS:
            raise RuntimeError(f"the check called your code more than {MAX_EVENTS} times")
        event = {"name": self.name, "inputs": digest((args, kwargs))}
        watched = _stateful(args, kwargs)
        before = {path: _state_of(obj) for path, obj in watched}
        calls: list[str] = []
        import warnings

        try:
            with _watch_course_lib(calls), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = self.fn(*args, **kwargs)
        except (KeyboardInterrupt, ReplayMismatch):
            raise
        except BaseException as e:  # SystemExit too: it costs this call, not the kernel
            frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(_COURSE_LIB)]
            where = f" (line {frames[-1].lineno}: {frames[-1].line})" if frames else ""
            event.update(kind="raise", type=type(e).__name__, message=str(e)[:2000], where=where)
            traceback.clear_frames(e.__traceback__)  # free what the failed call held (a memory hog) first
            if isinstance(e, MemoryError):
                import gc

                gc.collect()
            self._finish(event, watched, before, calls)
            raise
        if caught:  # the judge's stand-in warns the same, for checks that ask for a warning
            event["warnings"] = [[w.category.__name__, str(w.message)[:1000]] for w in caught[:20]]
            for w in caught:  # and the learner still sees them
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        try:
            event.update(kind="return", value=to_data(out))
            aliases = self._aliases(out, watched)
            if aliases:
                event["aliases"] = aliases
            gradients = self._gradients(out, watched)
            if gradients:
                event["gradients"] = gradients
        except NotData as e:
            event.update(kind="not data", what=str(e))
        self._finish(event, watched, before, calls)
        return out

    @staticmethod
    def _aliases(out, watched) -> list:
        """Returned tensors that share memory with an argument: (index in the flattened output, path)."""
        outs = out if isinstance(out, (tuple, list)) else (out,)
        found = []
        for i, o in enumerate(outs):
            if not isinstance(o, torch.Tensor):
                continue
            for path, obj in watched:
                if isinstance(obj, torch.Tensor) and o.untyped_storage().data_ptr() == obj.untyped_storage().data_ptr():
                    found.append([i, path, o is obj, list(o.shape), list(o.stride()), o.storage_offset()])
                    break
        return found

    @staticmethod
    def _gradients(out, watched) -> list:
        """For each returned tensor that carries a graph: the gradient of its sum with respect to every
        argument (and every parameter of a module argument) that requires grad — so the judge can hand the
        check a stand-in whose backward() (of it or of its sum) fills in the same gradients."""
        outs = out if isinstance(out, (tuple, list)) else (out,)
        leaves = []
        for path, obj in watched:
            if isinstance(obj, torch.Tensor) and obj.requires_grad:
                leaves.append((path, obj))
            elif isinstance(obj, nn.Module):
                leaves += [(f"{path}::{n}", p) for n, p in obj.named_parameters() if p.requires_grad]
        found = []
        for i, o in enumerate(outs):
            if not (isinstance(o, torch.Tensor) and o.grad_fn is not None and leaves):
                continue
            grads = torch.autograd.grad(o.sum(), [leaf for _, leaf in leaves], retain_graph=True, allow_unused=True)
            found.append([i, [[path, g.detach().clone()] for (path, _), g in zip(leaves, grads) if g is not None]])
        return found

    def _finish(self, event, watched, before, calls):
        changed = {}
        for path, obj in watched:
            after = _changed(before[path], obj)
            if after is not None:
                changed[path] = after
        event["changed"] = changed
        event["rng"] = rng_state()
        event["course_lib_calls"] = calls
        self.log.append(event)


def learner_object(obj):
    """The learner's own object beneath the grader's wrappers (the recorder, the replayer's stand-in, the
    input guard). A check that builds a learner's class inside :func:`in_sandbox` unwraps it first, so that
    the probe's data result is the one recorded call."""
    while hasattr(obj, "fn") and type(obj).__name__ in ("_Recorder", "_InputGuard"):
        obj = obj.fn
    return obj


def in_sandbox(fn: Callable) -> Callable:
    """Mark the part of a check that works on a learner's object beyond calling it: ``fn`` runs where the
    learner's code runs, and its result (data) is what the judge sees. Outside ``course-grade`` it is ``fn``."""
    mode = _MODE.get()
    if mode is None:
        return fn
    kind, table = mode
    name = f"in_sandbox:{getattr(fn, '__qualname__', 'probe')}"
    return _Recorder(name, fn, table) if kind == "record" else _Replayer(name, table)


def record(exercise, objects: list) -> tuple[list, Any]:
    """Run ``exercise``'s check on the learner's objects, recording every call. Returns (events, outcome)."""
    log: list = []
    wrapped = [_Recorder(name, obj, log) if callable(obj) else obj for name, obj in zip(exercise.names, objects)]
    token = _MODE.set(("record", log))
    _reset_rng()
    outcome = None
    try:
        outcome = run_exercise(exercise, wrapped)
    except (SystemExit, Exception) as e:  # only the recording matters here: the judge gives the verdict
        log.append({"name": "stopped", "kind": "stopped", "why": f"{type(e).__name__}: {str(e)[:300]}"})
    finally:
        _MODE.reset(token)
    return log, outcome


def record_in_kernel(exercise_id: str, namespace: dict, path: str) -> None:
    """Run by the cells ``course-grade`` appends to the learner's notebook: record one exercise's calls
    and save them (data only) to ``path``. The in-kernel verdict is not written anywhere."""
    from . import find_exercise

    import gc

    exercise = find_exercise(exercise_id)
    missing = [name for name in exercise.names if name not in namespace]
    events: list = []
    # An earlier cell's error keeps its frames (and, say, a memory hog) alive in sys.last_*: let them go.
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            setattr(sys, name, None)
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    if shell is not None:  # IPython keeps the last cell's exception, and so its frames, in two places too
        if hasattr(shell, "last_execution_result"):
            shell.last_execution_result = None
        if hasattr(getattr(shell, "InteractiveTB", None), "tb"):
            shell.InteractiveTB.tb = None
    gc.collect()
    if not missing:
        events, _ = record(exercise, [namespace[name] for name in exercise.names])
    partial = Path(f"{path}.partial")
    torch.save({"exercise": exercise_id, "missing": missing, "events": events}, partial)
    partial.replace(path)  # the judge sees a whole recording or none


# ---------------------------------------------------------------------------------------------
# the judge's side
# ---------------------------------------------------------------------------------------------
class _Replayer:
    def __init__(self, name: str, table: dict):
        self.name, self.table = name, table
        self.__name__ = name

    def __call__(self, *args, **kwargs):
        events = self.table["events"]
        if self.table["next"] >= len(events):
            raise ReplayMismatch(f"the run in your notebook stopped before the check called {self.name} "
                                 f"(call {self.table['next'] + 1}): see the problems below")
        event = events[self.table["next"]]
        if event.get("kind") == "stopped":
            raise ReplayMismatch(f"recording your code's answers stopped ({event.get('why')}) before the check "
                                 f"called {self.name}")
        self.table["next"] += 1
        if event.get("name") != self.name or event.get("inputs") != digest((args, kwargs)):
            raise ReplayMismatch(
                f"the check's call {self.table['next']} ({self.name}) got different inputs in your notebook "
                f"than in the grader: code in the notebook changed what the check does (a patched torch or "
                f"course_lib function, a changed random seed?)")
        for name in event.get("course_lib_calls", []):
            if name not in self.table["calls"]:
                self.table["calls"].append(name)
        watched = dict(_stateful(args, kwargs))
        for path, state in event.get("changed", {}).items():
            if path in watched:
                _apply_state(watched[path], state)
        _set_rng(event["rng"])
        import warnings

        for category, message in event.get("warnings", []):
            found = getattr(builtins, category, None)
            warnings.warn(message, found if isinstance(found, type) and issubclass(found, Warning) else UserWarning,
                          stacklevel=2)
        kind = event.get("kind")
        if kind == "raise":
            raise _rebuild_exception(event)
        if kind == "not data":
            raise CheckFailed(f"{self.name} returned {event['what']}, which the grader cannot read back: "
                              f"return tensors, numbers, strings, or tuples/lists/dicts of them")
        value = from_data(event["value"])
        value = _restore_gradients(value, event.get("gradients", []), watched)
        return _restore_aliases(value, event.get("aliases", []), watched)


def _leaf(watched: dict, path: str):
    path, _, parameter = path.partition("::")
    obj = watched.get(path)
    return dict(obj.named_parameters()).get(parameter) if parameter and isinstance(obj, nn.Module) else obj


def _restore_gradients(value, gradients, watched):
    """Give each returned tensor that had a graph a stand-in graph: same value, and backward() of its sum
    puts the recorded gradients into the judge's own arguments."""
    if not gradients:
        return value
    items = list(value) if isinstance(value, (tuple, list)) else [value]
    for index, grads in gradients:
        out = items[index].detach()
        link = out.new_zeros(())
        for path, g in grads:
            leaf = _leaf(watched, path)
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad and leaf.shape == g.shape:
                product = torch.nan_to_num(leaf * g.to(leaf.dtype))
                link = link + product.sum() - product.sum().detach()
        items[index] = out + link / max(out.numel(), 1) if link.requires_grad else out
    if isinstance(value, tuple):
        return tuple(items)
    return items if isinstance(value, list) else items[0]


def _restore_aliases(value, aliases, watched):
    if not aliases:
        return value
    items = list(value) if isinstance(value, (tuple, list)) else [value]
    for index, path, same, shape, stride, offset in aliases:
        arg = watched.get(path)
        if isinstance(arg, torch.Tensor):
            items[index] = arg if same else arg.as_strided(shape, stride, offset)
    if isinstance(value, tuple):
        return tuple(items)
    return items if isinstance(value, list) else items[0]


def _rebuild_exception(event) -> BaseException:
    kind = getattr(builtins, event.get("type", ""), None)
    message = event.get("message", "")
    if isinstance(kind, type) and issubclass(kind, Exception) and kind.__module__ == "builtins":
        try:
            error = kind(message)
        except Exception:
            error = LearnerRaised(f"{event['type']}: {message}")
    else:
        error = LearnerRaised(f"{event.get('type')}: {message}")
    error.learner_where = event.get("where", "")
    error.learner_type = event.get("type")
    return error


def read_recording(path: Path) -> dict:
    """A recording written by :func:`record_in_kernel`, read as data only."""
    data = torch.load(path, weights_only=True)
    if not isinstance(data, dict) or not isinstance(data.get("events"), list):
        raise ValueError("not a recording")
    return data


def judge(exercise, recording: dict):
    """The verdict on one exercise from its recording, computed in this process without learner code."""
    if recording.get("missing"):
        return ExerciseResult(exercise.id, exercise.title, False,
                              f"{', '.join(recording['missing'])} is not defined: keep the name the exercise "
                              f"gives, and make sure its cell runs without error")
    table = {"events": recording["events"], "next": 0, "calls": []}
    proxies = [_Replayer(name, table) for name in exercise.names]
    token = _MODE.set(("replay", table))
    _reset_rng()
    try:
        outcome = run_exercise(exercise, proxies)
    except ReplayMismatch as e:
        outcome = ExerciseResult(exercise.id, exercise.title, False, f"not graded: {e}")
    finally:
        _MODE.reset(token)
    if outcome.passed and table["next"] != len(table["events"]):
        outcome = ExerciseResult(exercise.id, exercise.title, False,
                                 "not graded: the recording from your notebook does not match the check "
                                 "(code in the notebook changed what the check does)")
    if table["calls"]:
        names = ", ".join(table["calls"][:4]) + (" …" if len(table["calls"]) > 4 else "")
        outcome.feedback += f" [note for the instructor: the submitted code called {names}]"
    return outcome
