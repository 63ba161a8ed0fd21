"""``course-bench [NAME]``: the same work through course_lib and through peft / trl / bitsandbytes,
timed alternately (A/B/A/B…) in one process and printed as ratios.

One module per benchmark (``lora``, ``nf4``, ``qlora``, ``sft``, ``dpo``, ``grpo``), each readable on its
own; ``timing`` holds the alternating timer they share, ``shapes`` the models they run on and
``trl_steps`` how a TRL trainer's steady-state step is timed. A benchmark imports the library it is
compared with (peft, trl, bitsandbytes) only when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from .dpo import bench_dpo
from .grpo import bench_grpo
from .lora import bench_lora
from .nf4 import bench_nf4
from .qlora import bench_qlora
from .sft import bench_sft
from .timing import alternate, alternate_all

BENCHMARKS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "lora": bench_lora, "sft": bench_sft, "nf4": bench_nf4, "qlora": bench_qlora, "dpo": bench_dpo, "grpo": bench_grpo}
PLANNED: dict[str, str] = {}

__all__ = ["BENCHMARKS", "alternate", "alternate_all", "main", *(f"bench_{name}" for name in BENCHMARKS)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="course-bench", description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help=f"one of: {', '.join(BENCHMARKS) or 'none yet'}")
    parser.add_argument("--repeats", type=int, default=5, help="timed A/B rounds (median reported)")
    parser.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")
    parser.add_argument("--bf16", action="store_true", help="lora: a bf16 model on the CPU too (the GPU always uses bf16)")
    parser.add_argument("--steps", type=int, default=None, help="dpo, grpo: optimizer steps per timed run")
    args = parser.parse_args(argv)
    if args.name is None:
        coming = "; coming: " + ", ".join(f"{k} arrives with {v}" for k, v in PLANNED.items()) if PLANNED else ""
        print(f"benchmarks: {', '.join(BENCHMARKS) or 'none yet'}{coming}")
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

