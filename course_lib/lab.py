"""The lab runner: ``course-lab [--profile cpu|cpu-bf16|gpu] [--model NAME_OR_PATH] [--only 00,03] [--out DIR]``.

Executes the lesson notebooks in a fresh Jupyter kernel each, papermill-style: a cell tagged
``parameters`` holds the defaults, and the runner inserts a cell right after it that overrides
``PROFILE``, ``MODEL`` and ``METRICS_PATH``. Each notebook reports its headline metrics with
`record_metrics` into ``METRICS_PATH``; the runner collects them into one summary table, printed
and written to ``OUT/report.md`` and ``OUT/report.json`` beside the executed notebooks, and a page to open
in a browser, ``OUT/report.html``, with each lesson's metrics and figures (`course_lib.lab_report`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .notebook_run import Interrupted, stop_signals_raise_interrupted
from .profile import PROFILES, get_profile

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"

# The syllabus: every lesson the course will have, in order. A lesson is available once its
# notebook exists; the README's syllabus table is generated from this list.
SYLLABUS = {
    "00": "Foundations: the embedded model, full fine-tuning, memory, forgetting",
    "01": "Soft prompts: prompt tuning, prefix tuning, P-tuning",
    "02": "IA3: learned rescaling vectors, multi-task switching",
    "03": "LoRA: low-rank adapters, merging, multi-adapter serving",
    "04": "NF4 quantization and QLoRA",
    "05": "Instruction templating and supervised fine-tuning (SFT)",
    "06": "Reward models and PPO (RLHF)",
    "07": "Direct preference optimization (DPO)",
    "08": "Group relative policy optimization (GRPO)",
    "09": "Choosing a technique: every method on one task, measured",
}


def write_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through ``path.partial`` and a rename: a reader, or a run interrupted
    half-way, never leaves a half-written file under the real name."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)
    return path


def lesson_notebooks() -> dict[str, Path]:
    """Available lessons: ``{"00": notebooks/00_foundations.ipynb, ...}``."""
    return {p.name[:2]: p for p in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))}


def runs_dir() -> Path:
    """Where each lesson's latest metrics are kept for later lessons to read: ``$COURSE_LIB_RUNS`` or
    ``~/.cache/course_lib/runs``."""
    return Path(os.environ.get("COURSE_LIB_RUNS") or Path.home() / ".cache" / "course_lib" / "runs")


def record_metrics(path: str | os.PathLike | None, *, headline: str, lesson: str | None = None, **metrics) -> dict:
    """Called by a notebook's last cell: its headline (one short line for the summary table) and
    the numbers behind it. Without a path (a learner running the notebook by hand) it only returns them.

    With ``lesson`` (e.g. ``"06"``) the record, stamped with the time and machine, is also kept in
    :func:`runs_dir` as that lesson's latest run, so that a later lesson can put its numbers beside
    this one's (:func:`recorded_metrics`) — by hand or under ``course-lab`` alike."""
    record = {"headline": headline, "metrics": metrics}
    if path:
        write_atomically(path, json.dumps(record, indent=2, default=float) + "\n")
    if lesson is not None:
        import platform
        from datetime import datetime, timezone

        stamped = {**record, "lesson": lesson, "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)"}
        runs_dir().mkdir(parents=True, exist_ok=True)
        target = runs_dir() / f"{lesson}.json"
        partial = target.with_suffix(".json.partial")  # a reader never sees half a file
        partial.write_text(json.dumps(stamped, indent=2, default=float) + "\n")
        partial.replace(target)
    return record


def recorded_metrics(lesson: str) -> dict | None:
    """The latest record of ``lesson`` kept by :func:`record_metrics` (keys ``headline``, ``metrics``,
    ``recorded``, ``machine``), or None when that lesson has not been run on this machine."""
    target = runs_dir() / f"{lesson}.json"
    return json.loads(target.read_text()) if target.exists() else None


@dataclass
class NotebookResult:
    lesson: str
    notebook: str
    status: str  # ok | error | timeout | kernel died
    seconds: float
    headline: str = ""
    detail: str = ""
    metrics: dict = field(default_factory=dict)


def inject_parameters(nb, parameters: dict) -> None:
    """Insert an ``injected-parameters`` cell after the cell tagged ``parameters`` (papermill's convention)."""
    import nbformat

    source = "# Parameters injected by course-lab\n" + "".join(f"{k} = {v!r}\n" for k, v in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    for i, existing in enumerate(nb.cells):
        if "parameters" in existing.get("metadata", {}).get("tags", []):
            nb.cells.insert(i + 1, cell)
            return
    raise ValueError("the notebook has no cell tagged 'parameters': tag the cell that sets PROFILE and MODEL")


def run_notebook(path: Path, out_dir: Path, parameters: dict, cell_timeout: int) -> NotebookResult:
    import nbformat
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    from .build import clear_outputs
    from .notebook_run import execute_notebook

    nb = nbformat.read(path, as_version=4)
    clear_outputs(nb)  # the committed outputs are from another run: never let them pass for this one's
    metrics_path = out_dir / f"{path.stem}.metrics.json"
    metrics_path.unlink(missing_ok=True)
    inject_parameters(nb, {**parameters, "METRICS_PATH": str(metrics_path)})
    start = time.perf_counter()
    status, detail = "ok", ""
    try:
        execute_notebook(nb, path.parent, cell_timeout=cell_timeout)
    except CellTimeoutError:
        status, detail = "timeout", f"a cell ran over {cell_timeout} s"
    except DeadKernelError as e:
        status, detail = "kernel died", str(e).splitlines()[0] if str(e) else ""
    except CellExecutionError as e:
        status = "error"
        detail = f"{e.ename}: {e.evalue}"
    seconds = time.perf_counter() - start
    write_atomically(out_dir / path.name, nbformat.writes(nb))
    result = NotebookResult(path.name[:2], path.name, status, round(seconds, 1), detail=detail)
    if metrics_path.exists():
        record = json.loads(metrics_path.read_text())
        result.headline, result.metrics = record["headline"], record["metrics"]
    elif status == "ok":
        result.detail = "the notebook did not call record_metrics"
    return result


def format_table(results: list[NotebookResult]) -> str:
    rows = [("notebook", "status", "seconds", "headline")]
    rows += [(r.notebook, r.status, f"{r.seconds:.1f}", r.headline or r.detail) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [" | ".join([*(row[i].ljust(widths[i]) for i in range(3)), row[3]]) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths) + "-+-" + "-" * 8)
    return "\n".join(lines)


def parse_only(only: str | None) -> list[str]:
    """The lessons to run, in order; an error naming what is wrong when there are none to run."""
    available = lesson_notebooks()
    if not available:
        raise ValueError(f"no lesson notebooks (NN_*.ipynb) in {NOTEBOOKS}: course-lab runs the notebooks of a "
                         f"source checkout, which a non-editable install does not include; clone the course "
                         f"repository and run `pip install -e .` in it, then course-lab")
    if not only:
        return list(available)
    wanted = [part.strip().zfill(2) for part in only.split(",") if part.strip()]
    for lesson in wanted:
        if lesson not in SYLLABUS:
            raise ValueError(f"--only {lesson}: there is no lesson {lesson}; lessons are 00-09 "
                             f"(available now: {', '.join(available) or 'none'})")
        if lesson not in available:
            raise ValueError(f"--only {lesson}: lesson {lesson} ({SYLLABUS[lesson]}) is planned, not available yet "
                             f"(available now: {', '.join(available)})")
    return wanted


def run_lab(profile: str = "cpu", model: str | None = None, only: str | None = None,
            out_dir: Path = ROOT / "lab_runs" / "latest", cell_timeout: int = 600) -> list[NotebookResult]:
    from tqdm.auto import tqdm

    lessons = parse_only(only)
    notebooks = lesson_notebooks()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("report.md", "report.json", "report.html"):  # a previous run's report must not pass for this one's,
        (out_dir / stale).unlink(missing_ok=True)  # should this run be interrupted before it writes its own
    results = []
    bar = tqdm(lessons, desc="lab", unit="notebook")
    for lesson in bar:
        bar.set_postfix_str(notebooks[lesson].name)
        results.append(run_notebook(notebooks[lesson], out_dir, {"PROFILE": profile, "MODEL": model}, cell_timeout))
    bar.close()
    table = format_table(results)
    header = f"course-lab · profile {profile} · model {model or 'embedded'} · {time.strftime('%Y-%m-%d %H:%M')}"
    write_atomically(out_dir / "report.json", json.dumps(
        {"profile": profile, "model": model, "results": [asdict(r) for r in results]}, indent=2) + "\n")
    write_atomically(out_dir / "report.md", f"# {header}\n\n```\n{table}\n```\n")
    from .lab_report import executed_notebooks, render_report

    write_atomically(out_dir / "report.html", render_report(header, results, executed_notebooks(out_dir, results)))
    print(f"\n{header}\n{table}\n\nexecuted notebooks and report: {out_dir}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="course-lab", description="Run the lesson notebooks and summarise them.")
    parser.add_argument("--profile", choices=list(PROFILES), default="cpu",
                        help="cpu: float32, the same numbers on every CPU; cpu-bf16: opt-in bf16 autocast on CPUs "
                             "with AMX/AVX-512 BF16; gpu: CUDA")
    parser.add_argument("--model", default=None, help="hub id or local path (default: the embedded model)")
    parser.add_argument("--only", default=None, help="comma-separated lesson numbers, e.g. 00,03")
    parser.add_argument("--out", type=Path, default=ROOT / "lab_runs" / "latest", help="output folder")
    parser.add_argument("--cell-timeout", type=int, default=600, help="seconds per cell (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        parse_only(args.only)
        if args.profile != "cpu":
            get_profile(args.profile)  # fails fast: no GPU, or no fast bf16 on this CPU
        if args.model is not None and not Path(args.model).expanduser().exists():
            from .models import _looks_like_path

            if _looks_like_path(args.model):
                raise ValueError(f"--model {args.model}: no such folder")
    except (ValueError, RuntimeError) as e:
        print(f"course-lab: error: {e}", file=sys.stderr)
        return 2
    # SIGTERM (kill, a CI job cancelled) unwinds like Ctrl-C: the running notebook's kernel is shut down
    # instead of orphaned, no report is written, and the exit code says which signal it was (130 / 143)
    try:
        with stop_signals_raise_interrupted():
            results = run_lab(args.profile, args.model, args.only, args.out, args.cell_timeout)
    except KeyboardInterrupt as e:
        print(f"\ncourse-lab: interrupted; no report written to {args.out}", file=sys.stderr)
        return e.exit_code if isinstance(e, Interrupted) else 130
    except Exception as e:
        print(f"\ncourse-lab: stopped by {type(e).__name__}: {e}; no report written to {args.out}", file=sys.stderr)
        raise
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
