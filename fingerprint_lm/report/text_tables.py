"""The one writer of the reports' tables, as CSV text or markdown lines: the sweep summary
(:mod:`~fingerprint_lm.report.tables`) and the run comparison (:mod:`~fingerprint_lm.report.compare`)
each pass the cell format of their own figures."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from typing import Any

Cell = Callable[[Any], str]


def csv_text(columns: Sequence[str], rows: Sequence[dict], cell: Cell) -> str:
    """A header row of ``columns``, then each row's values in that order, formatted by ``cell``
    (a missing key is ``cell(None)``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([cell(row.get(c)) for c in columns])
    return buffer.getvalue()


def markdown_lines(columns: Sequence[str], rows: Sequence[dict | Sequence], cell: Cell = str) -> list[str]:
    """The same table as markdown lines: header, rule, one line a row. A row is a dict keyed by
    column, or a sequence of values in the columns' order (for tables whose headers repeat a name,
    or whose cells are already text)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return lines + ["| " + " | ".join(cell(value) for value in _values(columns, row)) + " |" for row in rows]


def _values(columns: Sequence[str], row: dict | Sequence) -> list[Any]:
    if isinstance(row, dict):
        return [row.get(c) for c in columns]
    if len(row) != len(columns):
        raise ValueError(f"a row of {len(row)} values for {len(columns)} columns")
    return list(row)
