"""``course-bench [NAME | all]``: the same work through course_lib and through peft / trl / bitsandbytes,
timed alternately (A/B/A/B…) in one process and printed as ratios.

One module per benchmark (``lora``, ``nf4``, ``qlora``, ``sft``, ``dpo``, ``grpo``), each readable on its
own; ``timing`` holds the alternating timer they share, ``device`` the device they run on (``--device``),
``shapes`` the models they run on, ``trl_steps`` how a TRL trainer's steady-state step is timed,
``record`` what a run writes (results, machine, date, arguments) and ``table`` the README's table made
from it. A benchmark imports the library it is compared with (peft, trl, bitsandbytes) only when it runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from . import record
from .device import DEVICES, resolve_device
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
    parser.add_argument("name", nargs="?", help=f"one of: {', '.join(BENCHMARKS) or 'none yet'}; or all of them: all")
    parser.add_argument("--device", choices=DEVICES, default=None,
                        help="where to run (default: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--repeats", type=int, default=5, help="timed A/B rounds (median reported)")
    parser.add_argument("--json", type=str, default=None,
                        help="write the results to this JSON file, or to <date>-<device>.json in this folder "
                             "(all: default benchmarks/raw/<date>-<device>.json)")
    parser.add_argument("--note", type=str, default=None, help="a remark kept in the JSON, e.g. 'machine under load'")
    parser.add_argument("--bf16", action="store_true", help="lora: a bf16 model on the CPU too (the GPU always uses bf16)")
    parser.add_argument("--steps", type=int, default=None, help="dpo, grpo: optimizer steps per timed run")
    args = parser.parse_args(argv)
    if args.name is None:
        coming = "; coming: " + ", ".join(f"{k} arrives with {v}" for k, v in PLANNED.items()) if PLANNED else ""
        print(f"benchmarks: {', '.join(BENCHMARKS) or 'none yet'}{coming} (or all)")
        return 0
    if args.name != "all" and args.name not in BENCHMARKS:
        when = f" ({args.name} arrives with {PLANNED[args.name]})" if args.name in PLANNED else ""
        print(f"course-bench: error: no benchmark {args.name!r}{when}; available: {', '.join(BENCHMARKS) or 'none yet'}"
              " (or all)", file=sys.stderr)
        return 2
    if args.repeats < 1:
        print(f"course-bench: error: --repeats {args.repeats}: it must be at least 1", file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        print(f"course-bench: error: {error}", file=sys.stderr)
        return 2
    arguments = {k: v for k, v in vars(args).items()}
    args.device = device.type  # every benchmark reads it (device.bench_device)
    started, machine_info = dt.datetime.now(dt.timezone.utc), record.machine(device)
    if args.name != "all":  # one benchmark: its exceptions surface with their traceback
        clock = time.perf_counter()
        outcomes = {args.name: {"result": BENCHMARKS[args.name](args), "seconds": time.perf_counter() - clock}}
    else:
        outcomes = run_all(args)
    path = args.json or (record.default_path(device, started) if args.name == "all" else None)
    if path:
        path = Path(path)
        if path.is_dir():  # a folder: the default file name in it
            path = path / record.default_path(device, started).name
        path.parent.mkdir(parents=True, exist_ok=True)
        run = record.run_record(args.name, arguments, machine_info, started, outcomes, note=args.note)
        path.write_text(json.dumps(run, indent=2) + "\n")
        print(f"course-bench: results written to {path}")
    failed = [name for name, outcome in outcomes.items() if "error" in outcome]
    if failed:
        print(f"course-bench: error: {len(failed)} of {len(outcomes)} benchmarks failed: "
              + "; ".join(f"{name}: {outcomes[name]['error']}" for name in failed), file=sys.stderr)
        return 1
    return 0


def run_all(args: argparse.Namespace) -> dict[str, dict]:
    """Every benchmark in turn, each one's result or error and its seconds. A benchmark that fails is
    recorded (its traceback printed) and the others still run."""
    outcomes = {}
    for name, bench in BENCHMARKS.items():
        print(f"\n=== course-bench {name} ===", flush=True)
        clock = time.perf_counter()
        try:
            outcomes[name] = {"result": bench(args)}
        except Exception as error:  # noqa: BLE001 — one broken benchmark must not cost the others' results
            traceback.print_exc()
            outcomes[name] = {"error": f"{type(error).__name__}: {error}"}
        outcomes[name]["seconds"] = time.perf_counter() - clock
    return outcomes
