"""Benchmark rows that take minutes each: kept in a JSON file between runs (a rerun skips finished
rows) and printed as a markdown table."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable

Column = tuple[str, Callable[[dict], str]]  # header, the cell of a row


def load_rows(path: pathlib.Path) -> dict[str, dict]:
    """The rows recorded so far, by name ({} when the file does not exist yet)."""
    return json.loads(path.read_text()) if path.exists() else {}


def save_rows(path: pathlib.Path, rows: dict[str, dict]) -> None:
    """Writes the rows atomically (a run stopped half-way leaves the previous file whole)."""
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, path)


def save_row(path: pathlib.Path, name: str, row: dict) -> dict[str, dict]:
    """Records one finished row into the file as it is now (rows another run wrote since this one
    started are kept: saving a whole dict loaded hours earlier lost the pq-4 KV row once) and
    returns all rows."""
    rows = load_rows(path) | {name: row}
    save_rows(path, rows)
    return rows


def markdown_table(rows: list[dict], columns: list[Column]) -> str:
    """One line per row; the first column left-aligned, the others (figures) right-aligned."""
    lines = ["| " + " | ".join(header for header, _ in columns) + " |"]
    lines.append("|---|" + "---:|" * (len(columns) - 1))
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
    return "\n".join(lines)
