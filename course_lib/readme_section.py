"""Generated sections of README.md: the text between two HTML-comment markers is rewritten from data
(the claims table from the executed notebooks, the performance table from the benchmark results), and
``--check`` says whether it is current, so a test keeps the README in step with what it summarises."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable


def replace_section(readme: str | Path, start: str, end: str, body: str, *, check: bool = False) -> bool:
    """Put ``body`` between the ``start`` and ``end`` markers of ``readme``; with ``check``, only say whether
    it is already there. Returns True when the README already had (or now has) that body."""
    text = Path(readme).read_text()
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} markers: add them where the table goes")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    wanted = f"{head}{start}\n{body}\n{end}{tail}"
    if wanted == text:
        return True
    if check:
        return False
    Path(readme).write_text(wanted)
    return True


def section_cli(argv: list[str] | None, *, prog: str, table: str, source: str,
                update_readme: Callable[..., bool]) -> int:
    """The command line of a generated section: rebuild ``table`` from ``source``, or with ``--check`` exit 1
    when the README's copy is stale."""
    parser = argparse.ArgumentParser(prog=prog, description=f"Rebuild the README's {table} from {source}.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the README's table is stale")
    args = parser.parse_args(argv)
    if update_readme(check=args.check):
        return 0
    print(f"README.md's {table} is stale: run `{prog}`", file=sys.stderr)
    return 1
