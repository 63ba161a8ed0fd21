"""What a ``course-bench`` run writes: every benchmark's result (or its error) with the machine it ran on, the
date and the command's arguments, in one JSON file — the source of the README's performance table
(``course_lib.bench.table``)."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
from importlib import metadata
from pathlib import Path

import torch

from .device import device_name

LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "triton")
RAW_DIR = Path("benchmarks") / "raw"  # relative to where course-bench runs: the repository root


def machine(device: torch.device) -> dict:
    """The machine a run measured: device, CPU model and count, GPU and its memory, Python and the library
    versions, and the load average when the run started (a busy machine slows every side, not alike)."""
    info = {"device": device_name(device), "device_type": device.type, "cpu_count": os.cpu_count(),
            "cpu_model": cpu_model(), "platform": platform.platform(), "python": platform.python_version(),
            "versions": {name: _version(name) for name in LIBRARIES},
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(gpu=properties.name, gpu_memory_gib=properties.total_memory / 2 ** 30)
    return info


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one, else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def default_path(device: torch.device, when: dt.datetime) -> Path:
    """``benchmarks/raw/<date>-<device>.json``: ``2026-12-02-cpu.json``, ``2026-12-02-nvidia-h200.json``."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return RAW_DIR / f"{when:%Y-%m-%d}-{slug}.json"


def run_record(command: str, arguments: dict, machine_info: dict, started: dt.datetime,
               benchmarks: dict[str, dict], note: str | None = None) -> dict:
    """The JSON a run writes. ``machine_info`` is :func:`machine` taken when the run started (its load
    average then; the load at the end is added here). ``benchmarks`` maps a name to ``{"result": …,
    "seconds": …}`` or, when it failed, ``{"error": "Type: message", "seconds": …}``."""
    machine_info = {**machine_info, "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    return {"command": command, "arguments": arguments, "date": started.isoformat(timespec="seconds"),
            "machine": machine_info, "note": note, "benchmarks": benchmarks}
