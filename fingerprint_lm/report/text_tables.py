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


def markdown_lines(columns: Sequence[str], rows: Sequence[dict], cell: Cell) -> list[str]:
    """The same table as markdown lines: header, rule, one line a row."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return lines + ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
