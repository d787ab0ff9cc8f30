"""Tables for the terminal and for Markdown reports: one formatter for the leaderboard, the dry run,
the study report and the benchmarks."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


def cell(value: Any, *, digits: int = 4) -> str:
    """A value as a table cell: floats to `digits` significant digits, None as empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def text_table(rows: Iterable[dict[str, Any]], columns: Sequence[str], *, left: Sequence[str] = (), indent: str = "",
               headers: dict[str, str] | None = None) -> list[str]:
    """Aligned plain-text lines, a header line first: columns in `left` are left-aligned, the rest right-aligned."""
    head = [(headers or {}).get(c, c) for c in columns]
    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: indent + "  ".join(  # noqa: E731
        x.ljust(w) if c in left else x.rjust(w) for c, x, w in zip(columns, cells, widths)).rstrip()
    return [fmt(head), *(fmt(b) for b in body)]


def markdown_table(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> list[str]:
    """GitHub-flavoured Markdown table lines."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return lines
