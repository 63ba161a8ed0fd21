"""Memory: a popular back-of-the-envelope formula, and what a training step really holds.

A widely used rule of thumb (Sam Stoelinga, "Calculating GPU memory for serving LLMs", Substratus blog)
estimates serving memory as ``params × 4 B / (32 / bits) × 1.2`` — the weights at the given precision
plus 20 % overhead. `estimate_serving_memory_gb` is that formula.

Training holds more, and each part can be counted exactly, on any device:

* `training_state_bytes` predicts, from the parameters alone, the weights, the gradients (one per
  trainable parameter) and the optimizer state (AdamW: two moments and a step counter per trainable
  tensor); `gradient_bytes` and `optimizer_state_bytes` count what a real backward pass and a real
  optimizer step created, so the prediction can be checked;
* `saved_activation_bytes` counts what autograd keeps for the backward pass (the activations).

`measure_peak_memory` measures the peak of a piece of code: the CUDA allocator's peak on a GPU (the
number to compare with the exact sum), the process' peak resident set on a CPU (which mostly shows the
allocator reusing freed memory, so the lessons report exact bytes there instead).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch
from torch import nn

GB = 1e9  # the rule of thumb's "GB" is decimal: 7e9 params × 2 B × 1.2 = 16.8 GB ("around 17 GB")


def estimate_serving_memory_gb(n_params: float, bits: int = 16, overhead: float = 1.2) -> float:
    """The serving rule of thumb: ``n_params × 4 bytes / (32 / bits) × overhead``, in GB (1e9 bytes)."""
    if bits <= 0 or bits > 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    return n_params * 4 / (32 / bits) * overhead / GB


def bytes_of(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by ``tensors``, a tensor sharing another's memory counted once (on the ``meta`` device,
    which has no memory to compare, the same tensor object counted once)."""
    seen, total = set(), 0
    for t in tensors:
        key = id(t) if t.is_meta else t.data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def tensor_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each shared tensor counted once."""
    return bytes_of([*model.parameters(), *model.buffers()])


def parameter_bytes(model: nn.Module, trainable_only: bool = False) -> int:
    """Bytes of the model's parameters (all, or only those with ``requires_grad``), a tensor shared by two
    modules (tied embedding and head) counted once. Buffers (e.g. rotary frequencies) are not parameters."""
    return bytes_of([p for p in model.parameters() if p.requires_grad or not trainable_only])


ADAMW_STEP_COUNTER_BYTES = 4  # torch's AdamW keeps each tensor's step count as a float32 scalar tensor


@dataclass(frozen=True)
class TrainingStateBytes:
    """What a training step keeps besides activations, in bytes."""

    weights: int  # every parameter, at its dtype
    gradients: int  # one gradient per trainable parameter, same shape and dtype
    optimizer: int  # the optimizer's state for the trainable parameters

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


def training_state_bytes(model: nn.Module, optimizer: Literal["adamw", "sgd"] = "adamw") -> TrainingStateBytes:
    """The exact bytes of weights, gradients and optimizer state of training ``model``, predicted from its
    parameters (works on a ``meta``-device model, so a 7 B config costs nothing to count).

    * weights: every parameter once (tied embedding/head: one matrix);
    * gradients: ``p.grad`` has ``p``'s shape and dtype, for trainable ``p`` only; it appears during
      ``backward()`` and lives until ``zero_grad(set_to_none=True)``;
    * optimizer: AdamW (Loshchilov & Hutter 2019, Alg. 2) keeps per trainable tensor the first and second
      moments m, v (``exp_avg``, ``exp_avg_sq``: the tensor's shape and dtype) and torch's step counter (a
      float32 scalar tensor); SGD with momentum keeps one momentum buffer. Both are created by the first
      ``optimizer.step()`` and live as long as the optimizer.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = parameter_bytes(model, trainable_only=True)
    if optimizer == "adamw":
        state = 2 * grads + ADAMW_STEP_COUNTER_BYTES * len(trainable)
    elif optimizer == "sgd":
        state = grads
    else:
        raise ValueError(f"optimizer {optimizer!r}: use 'adamw' or 'sgd' (with momentum)")
    return TrainingStateBytes(parameter_bytes(model), grads, state)


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of the gradients that exist now (``p.grad`` of each parameter, once): a measurement, to
    compare with :func:`training_state_bytes`' prediction after a backward pass."""
    return bytes_of([p.grad for p in model.parameters() if p.grad is not None])


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (moments, momentum buffers, step counters), each once:
    what a real optimizer holds, to compare with :func:`training_state_bytes`' prediction."""
    return bytes_of([v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)])


@dataclass
class PeakMemory:
    peak_bytes: int  # above the level at the start
    method: str

    @property
    def mb(self) -> float:
        return self.peak_bytes / 1e6


_STATUS = Path("/proc/self/status")


def _rss_kb(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in {_STATUS}")


def _reset_peak_rss() -> bool:
    """Linux lets a process reset its own peak RSS (VmHWM) by writing 5 to clear_refs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_peak_memory(fn: Callable[[], Any], device: torch.device | str | None = None) -> tuple[Any, PeakMemory]:
    """Run ``fn()`` and return ``(result, PeakMemory)``: how far memory rose above where it started."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, PeakMemory(torch.cuda.max_memory_allocated(device) - start, "cuda max_memory_allocated")
    if _STATUS.exists() and _reset_peak_rss():
        start = _rss_kb("VmRSS")
        result = fn()
        return result, PeakMemory(max(0, _rss_kb("VmHWM") - start) * 1024, "peak RSS (VmHWM)")
    return _sampled_peak(fn)


def _sampled_peak(fn: Callable[[], Any]) -> tuple[Any, PeakMemory]:
    """Fallback where VmHWM cannot be reset: sample RSS every millisecond in a thread."""
    import psutil

    proc, peak, done = psutil.Process(), [0], threading.Event()
    start = proc.memory_info().rss

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return result, PeakMemory(max(0, peak[0] - start), "sampled RSS")


def saved_activation_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> tuple[Any, int]:
    """Run ``fn()`` and return ``(result, bytes)``: the storage of every tensor autograd saved for the
    backward pass while it ran, each storage counted once (views of one tensor share it), leaving out
    the storages of ``exclude`` (pass the model's parameters: weights are not activations)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(seen.values())

from .planner import MemoryPlan, feasibility_table, plan, plan_for_config  # noqa: E402,F401  (the planner builds on this module)
