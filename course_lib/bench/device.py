"""The device a benchmark runs on, as ``course-bench --device cpu|cuda`` chose it, and what a timer needs
from it (a synchronisation point, a name for the results)."""

from __future__ import annotations

import argparse
from typing import Callable

import torch

DEVICES = ("cpu", "cuda")


def resolve_device(requested: str | None) -> torch.device:
    """``"cpu"``, ``"cuda"``, or ``None`` for CUDA when a GPU is visible and the CPU otherwise. Asking for
    CUDA without a GPU is an error that says what to do instead."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested not in DEVICES:
        raise ValueError(f"device {requested!r}: use one of {', '.join(DEVICES)}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible here (torch.cuda.is_available() is False; "
                         f"torch {torch.__version__}); run with --device cpu, or on a machine with a GPU")
    return torch.device(requested)


def bench_device(args: argparse.Namespace) -> torch.device:
    """The device of one benchmark run: ``args.device`` (set by ``course-bench --device``), or the default of
    :func:`resolve_device` when the namespace has none (a benchmark called directly, as the tests do)."""
    return resolve_device(getattr(args, "device", None))


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What a timer calls before reading the clock: CUDA's queue drained on a GPU, nothing on a CPU."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def device_name(device: torch.device) -> str:
    """The GPU's name (``NVIDIA H200``), or ``cpu``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
