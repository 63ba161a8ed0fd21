"""The README's performance table, made from the newest ``course-bench all`` results.

``python -m course_lib.bench.table`` reads every run in ``benchmarks/raw/*.json`` that ``course-bench all``
wrote (:mod:`course_lib.bench.record`), takes the newest one per device type (cpu, cuda), and writes one row
per benchmark headline between the README's ``<!-- bench:start -->`` and ``<!-- bench:end -->`` markers:
what is compared, course_lib's figure, the library's, the ratio, the machine and the date. The headline
compares like with like (the same packing, padding, checkpointing, precision and batch on both sides);
where the library's defaults differ, the defaults-against-defaults figure follows as a second row.
``--check`` only says whether the README is current (exit 1 when not), as ``tests/test_bench_table.py`` does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

from ..readme_section import replace_section, section_cli
from .timing import ratio_range

README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
ROOT = Path(__file__).resolve().parent.parent.parent
RAW_DIR = ROOT / "benchmarks" / "raw"
NO_VALUE = "—"


def _time(seconds: float | None) -> str:
    """Seconds with a unit a reader takes in at a glance, three significant figures: 812 µs, 12.3 ms, 4.56 s."""
    if seconds is None:
        return NO_VALUE
    for scale, unit in ((1, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if seconds >= scale or unit == "µs":
            return f"{seconds / scale:.3g} {unit}"
    raise AssertionError("unreachable")


def _row(what: str, ours: str, theirs: str, ratio: float | None) -> dict:
    return {"what": what, "course_lib": ours, "library": theirs, "ratio": ratio}


def _timed(what: str, ours: float | None, theirs: float | None) -> dict:
    ratio = ours / theirs if ours is not None and theirs else None
    return _row(what, _time(ours), _time(theirs), ratio)


def lora_rows(result: dict) -> list[dict]:
    """LoRA vs peft: the train step (the headline), mixed-adapter serving, and on a GPU peak step memory."""
    setting = f"{result['shape']} model, {result['dtype'].removeprefix('torch.')}, batch {result['batch']}"
    rows = [_timed(f"LoRA train step vs peft ({setting}; no checkpointing on either side)", *result["train_step_s"]),
            _timed("LoRA serving 4 adapters + base rows in one batch vs peft's adapter_names", *result["mixed_serve_s"])]
    if result.get("peak_mb"):
        ours, theirs = result["peak_mb"]
        rows.append(_row("LoRA peak train-step memory vs peft", f"{ours:.0f} MB", f"{theirs:.0f} MB", ours / theirs))
    return rows


def nf4_rows(result: dict) -> list[dict]:
    """NF4 dequantization vs bitsandbytes: time over the three weight shapes, plain and double-quantized."""
    shapes = ", ".join("×".join(map(str, row["shape"])) for row in result["rows"])
    plain = [sum(row["us"][side] for row in result["rows"]) / 1e6 for side in (0, 1)]
    double = [sum(row["dq_us"][side] for row in result["rows"]) / 1e6 for side in (0, 1)]
    return [_timed(f"NF4 → bf16 dequantization vs bitsandbytes, same bytes, blocksize 64 ({shapes}, summed)", *plain),
            _timed("the same with double quantization (8-bit absmax)", *double)]


def qlora_rows(result: dict) -> list[dict]:
    """course_lib's QLoRA vs bitsandbytes + peft's, checkpointing off (the headline) and on."""
    by_kind = {(row["kind"], row["checkpointing"]): row for row in result["rows"]}
    rows = []
    for checkpointing in (False, True):
        ours = by_kind.get(("QLoRA (course_lib)", checkpointing))
        theirs = by_kind.get(("QLoRA (bitsandbytes + peft)", checkpointing))
        if ours is None or theirs is None:
            continue
        state = "on" if checkpointing else "off"
        what = (f"the same, both with checkpointing {state}" if checkpointing else
                f"QLoRA train step (NF4 + double quant, {result['shape']} model, {result['dtype'].removeprefix('torch.')}, "
                f"batch {result['batch']}) vs bitsandbytes + peft, both with checkpointing {state}")
        rows.append(_timed(what, ours["step_s"], theirs["step_s"]))
        if ours.get("peak_gib") and theirs.get("peak_gib"):
            rows.append(_row(f"QLoRA peak step memory vs bitsandbytes + peft, both with checkpointing {state}",
                             f"{ours['peak_gib']:.2f} GiB", f"{theirs['peak_gib']:.2f} GiB",
                             ours["peak_gib"] / theirs["peak_gib"]))
    return rows


def sft_rows(result: dict) -> list[dict]:
    """SFT over the same rows vs TRL: both packed, float32, no checkpointing (headline); TRL's defaults."""
    run = result["run_s"]
    return [_timed(f"SFT, one pass over {result['rows']} chat rows, vs SFTTrainer; both packed into rows of 128 "
                   "(TRL: bfd, padding-free), float32, no checkpointing", run["course_lib"], run["trl_packed"]),
            _timed(f"the same vs SFTTrainer's defaults ({result['settings']['trl_defaults']}) — defaults row",
                   run["course_lib"], run["trl_defaults"])]


def _trl_step_rows(task: str, result: dict) -> list[dict]:
    """course_lib's step vs a TRL trainer's. Headline: the same work — course_lib with every completion
    re-running its prompt (``share_prompt=False``, padded like TRL) against TRL in float32 without
    checkpointing; then course_lib's default, each prompt run once (prefix sharing, which TRL 1.16 lacks
    outside vLLM), against the same; then defaults against defaults."""
    step, trainer = result["step_s"], "DPOTrainer" if task == "DPO" else "GRPOTrainer"
    equal_work = step.get("course_lib_concatenated", step["course_lib"])  # results before prefix sharing: one side
    rows = [_timed(f"{task} step vs {trainer}, same work: both float32, no checkpointing, every completion runs "
                   "its prompt (course_lib share_prompt=False)", equal_work, step["trl_float32"])]
    if "course_lib_concatenated" in step:
        spread = result.get("step_ratio_rounds", {}).get("float32")
        rounds = f"; {len(spread)} rounds {ratio_range(spread)}" if spread else ""
        rows.append(_timed("course_lib's default, each prompt run once (prefix sharing; TRL has none without vLLM), "
                           f"vs the same TRL{rounds}", step["course_lib"], step["trl_float32"]))
    rows.append(_timed(f"course_lib's defaults vs {trainer}'s ({result['trl_settings']['defaults']}) — defaults row",
                       step["course_lib"], step["trl_defaults"]))
    return rows


def dpo_rows(result: dict) -> list[dict]:
    """DPO step vs DPOTrainer (:func:`_trl_step_rows`)."""
    return _trl_step_rows("DPO", result)


def grpo_rows(result: dict) -> list[dict]:
    """GRPO step (generation included) vs GRPOTrainer, as DPO; then generation alone, same work first."""
    rows = _trl_step_rows("GRPO", result)
    rows[0]["what"] = rows[0]["what"].replace("GRPO step", "GRPO step (generation included)", 1)
    ours, theirs = result["generation_s"]
    if "generation_s_concatenated" in result:
        rows.append(_timed("GRPO generation alone, same prompts and sampling, each completion re-encoding its prompt",
                           result["generation_s_concatenated"], theirs))
        rows.append(_timed("the same with each prompt prefilled once (course_lib's default)", ours, theirs))
    else:
        rows.append(_timed("GRPO generation alone, same prompts and sampling", ours, theirs))
    return rows


HEADLINES: dict[str, Callable[[dict], list[dict]]] = {
    "lora": lora_rows, "sft": sft_rows, "nf4": nf4_rows, "qlora": qlora_rows, "dpo": dpo_rows, "grpo": grpo_rows}


def all_runs(raw_dir: Path = RAW_DIR) -> list[dict]:
    """Every ``course-bench all`` run in ``raw_dir``, oldest first (other JSON files there are skipped)."""
    runs = []
    for path in sorted(Path(raw_dir).glob("*.json")):
        run = json.loads(path.read_text())
        if isinstance(run, dict) and run.get("command") == "all" and "benchmarks" in run:
            runs.append({**run, "path": path.name})
    return sorted(runs, key=lambda run: run["date"])


def latest_runs(raw_dir: Path = RAW_DIR) -> list[dict]:
    """The newest ``course-bench all`` run per device type (cpu, cuda), cpu first."""
    newest = {run["machine"]["device_type"]: run for run in all_runs(raw_dir)}
    return [newest[kind] for kind in sorted(newest)]


def _machine(run: dict) -> str:
    info = run["machine"]
    if info["device_type"] == "cuda":
        return f"{info.get('gpu') or info['device']}"
    load = info.get("load_average")
    return f"CPU, {info['cpu_count']} cores" + (f", load {load[0]:.1f}" if load else "")


def _command(run: dict) -> str:
    """The command that made a run: ``course-bench all --device cpu --repeats 3`` (and ``--steps``, ``--bf16``)."""
    arguments = run["arguments"]
    words = ["course-bench all", f"--device {run['machine']['device_type']}", f"--repeats {arguments.get('repeats')}"]
    words += [f"--steps {arguments['steps']}"] if arguments.get("steps") else []
    words += ["--bf16"] if arguments.get("bf16") else []
    return " ".join(words)


def _cell(text: str) -> str:
    """Text that stays inside one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "/")


def readme_table(raw_dir: Path = RAW_DIR) -> str:
    """The Markdown the README holds between the bench markers."""
    runs = latest_runs(raw_dir)
    if not runs:
        return "No `course-bench all` results in `benchmarks/raw/` yet: run `course-bench all`."
    lines = ["Generated by `python -m course_lib.bench.table` from the newest `course-bench all` run per device in",
             "`benchmarks/raw/`. Ratios are course_lib's time (or memory) ÷ the library's on the same work, timed",
             "alternately in one process (median): below 1 is course_lib faster. Each benchmark's first row compares",
             "like with like; a \"defaults row\" runs the library as it ships. Hand-written history and GPU runs before",
             "these: [benchmarks/RESULTS.md](benchmarks/RESULTS.md).",
             "",
             "| benchmark | compared | course_lib | library | ratio | machine | date |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    notes = []
    for run in runs:
        machine, date = _machine(run), run["date"][:10]
        for name, outcome in run["benchmarks"].items():
            if "error" in outcome:
                rows = [_row(f"failed: {outcome['error'][:200]}", NO_VALUE, NO_VALUE, None)]
            elif name in HEADLINES:
                rows = HEADLINES[name](outcome["result"])
            else:
                rows = [_row("(no headline defined in course_lib.bench.table)", NO_VALUE, NO_VALUE, None)]
            for row in rows:
                ratio = f"**{row['ratio']:.2f}×**" if row["ratio"] is not None else NO_VALUE
                lines.append(f"| {name} | {_cell(row['what'])} | {_cell(row['course_lib'])} | {_cell(row['library'])} "
                             f"| {ratio} | {_cell(machine)} | {date} |")
        versions = run["machine"]["versions"]
        libraries = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
        notes.append(f"- {date} {_cell(machine)} (`{run['path']}`, `{_command(run)}`): "
                     f"{_cell(run['machine'].get('cpu_model') or '')}; {libraries}."
                     + (f" {_cell(run['note'])}" if run.get("note") else ""))
    return "\n".join(lines + [""] + notes)


def update_readme(readme: Path = ROOT / "README.md", raw_dir: Path = RAW_DIR, check: bool = False) -> bool:
    """Rewrite the table between the README's bench markers; with ``check``, only say whether it is current.
    Returns True when the README already had (or now has) the table the results give."""
    return replace_section(readme, README_START, README_END, readme_table(raw_dir), check=check)


def main(argv: list[str] | None = None) -> int:
    return section_cli(argv, prog="python -m course_lib.bench.table",
                       table="performance table", source="benchmarks/raw/",
                       update_readme=update_readme)

if __name__ == "__main__":
    sys.exit(main())
