"""Profiles: the one switch between a laptop CPU run and the GPU lab.

A notebook's ``parameters`` cell says ``PROFILE = "cpu"``; ``get_profile(PROFILE)`` turns that into
a device, the dtype to load weights in, the autocast dtype for training, and a scale for step
counts and batch sizes. The notebooks never test ``torch.cuda`` themselves, so they run unchanged
on either.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

PROFILES = ("cpu", "cpu-bf16", "gpu")


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """bf16 autocast pays off on a CPU only with AMX or AVX-512 BF16; elsewhere it is slower than fp32."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


@dataclass(frozen=True)
class Profile:
    name: str
    device: torch.device
    dtype: torch.dtype  # weights as loaded (float32: the master copy the optimizer updates)
    autocast_dtype: torch.dtype | None  # matmuls in this dtype during training, None = off
    scale: int  # multiply the cpu profile's steps / batch sizes by this

    def steps(self, cpu_steps: int) -> int:
        return cpu_steps * self.scale


def get_profile(name: str = "cpu") -> Profile:
    """``cpu``: float32 everywhere, so a lesson's numbers are the same on every CPU (its committed outputs
    reproduce). ``cpu-bf16``: the opt-in for CPUs with AMX or AVX-512 BF16 — faster there, but the
    numbers move (bf16 matmuls round differently); refused where the CPU has neither, since bf16
    autocast is then slower than float32. ``gpu``: CUDA with bf16 autocast and 4x the steps."""
    if name == "cpu":
        return Profile("cpu", torch.device("cpu"), torch.float32, None, 1)
    if name == "cpu-bf16":
        if not cpu_has_fast_bf16():
            raise RuntimeError("profile 'cpu-bf16' needs a CPU with AMX or AVX-512 BF16 (see the flags in "
                               "/proc/cpuinfo); without them bf16 autocast is slower than float32: use profile 'cpu'")
        return Profile("cpu-bf16", torch.device("cpu"), torch.float32, torch.bfloat16, 1)
    if name == "gpu":
        if not torch.cuda.is_available():
            raise RuntimeError("profile 'gpu' needs a CUDA GPU, and torch.cuda.is_available() is False: "
                               "use profile 'cpu' here")
        return Profile("gpu", torch.device("cuda"), torch.float32, torch.bfloat16, 4)
    raise ValueError(f"unknown profile {name!r}; choose one of {PROFILES}")
