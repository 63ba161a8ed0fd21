"""``course-bench [NAME]``: the same work through course_lib and through peft / trl / bitsandbytes,
timed alternately (A/B/A/B…) in one process and printed as ratios.

Benchmarks register here as the lessons that own them land (LoRA, NF4, SFT). Timings are medians
of alternating runs, because this kind of machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable

import torch

BENCHMARKS: dict[str, Callable[[argparse.Namespace], dict]] = {}
PLANNED = {"lora": "lesson 03", "nf4": "lesson 04", "sft": "lesson 05"}


def alternate(a: Callable[[], object], b: Callable[[], object], *, repeats: int = 5, warmup: int = 1,
              sync: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b``, run alternately so drift in machine load hits both alike."""
    for _ in range(warmup):
        a(), b()
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((a, times_a), (b, times_b)):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="course-bench", description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help=f"one of: {', '.join(BENCHMARKS) or 'none yet'}")
    parser.add_argument("--repeats", type=int, default=5, help="timed A/B rounds (median reported)")
    parser.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.name is None:
        print(f"benchmarks: {', '.join(BENCHMARKS) or 'none yet'}; coming: "
              + ", ".join(f"{k} arrives with {v}" for k, v in PLANNED.items()))
        return 0
    if args.name not in BENCHMARKS:
        when = f" ({args.name} arrives with {PLANNED[args.name]})" if args.name in PLANNED else ""
        print(f"course-bench: error: no benchmark {args.name!r}{when}; available: {', '.join(BENCHMARKS) or 'none yet'}",
              file=sys.stderr)
        return 2
    result = BENCHMARKS[args.name](args)
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
