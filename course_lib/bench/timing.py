"""Timing that survives a noisy, shared machine: the functions under comparison run alternately
(A/B/A/B…) and each one's median is reported, so drift in machine load hits every side alike."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def alternate(a: Callable[[], object], b: Callable[[], object], *, repeats: int = 5, warmup: int = 1,
              sync: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b``, run alternately so drift in machine load hits both alike."""
    t_a, t_b = alternate_all([a, b], repeats=repeats, warmup=warmup, sync=sync)
    return t_a, t_b


def alternate_all(fns: list[Callable[[], object]], *, repeats: int = 5, warmup: int = 1,
                  sync: Callable[[], None] = lambda: None) -> list[float]:
    """Median seconds of each function, run in turn (A/B/C/A/B/C…)."""
    return [statistics.median(t) for t in alternate_rounds(fns, repeats=repeats, warmup=warmup, sync=sync)]


def ratio_range(ratios: list[float]) -> str:
    """The spread of per-round ratios as the benchmarks print and tabulate it: ``"0.44–0.51×"``."""
    return f"{min(ratios):.2f}–{max(ratios):.2f}×"


def alternate_rounds(fns: list[Callable[[], object]], *, repeats: int = 5, warmup: int = 1,
                     sync: Callable[[], None] = lambda: None) -> list[list[float]]:
    """Seconds of every round of each function, run in turn (A/B/C/A/B/C…) after ``warmup`` untimed rounds:
    what :func:`alternate_all` takes the median of, for a caller that also reports the spread."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            spent.append(time.perf_counter() - start)
    return times
