"""Writing a stream of Arrow record batches for people (an aligned table that fits the terminal) or for
scripts (CSV, JSON lines, Parquet), batch by batch: a large result is never held in memory whole.

Widths are display widths (rich's cell widths: a CJK character takes two cells, a combining accent none),
not ``len``, so that a row with a Japanese file name stays aligned."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import IO, Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from rich.cells import cell_len, set_cell_size

FORMATS = ("table", "csv", "json", "parquet")
MAX_CELL_CHARS = 60  # a cell is cut here unless --wide
MIN_COLUMN_CELLS = 6  # a column narrowed to fit the terminal keeps at least this (or its header's width)
GAP = "  "
BOX_CORNERS = ("x0", "y0", "x1", "y1")


@dataclass(frozen=True)
class TableLayout:
    """How the text table is laid out: the terminal's width to fit (None: as wide as the cells make it),
    and whether cells are shown whole (``wide``). ``shorten``: a column name → a function shortening its
    values for display (a document URI relative to the run's input)."""

    width: int | None = None
    wide: bool = False
    shorten: dict[str, Callable[[str], str]] | None = None


def _fit(text: str, cells: int) -> str:
    """``text`` cut to ``cells`` display cells, an ellipsis marking the cut."""
    if cell_len(text) <= cells:
        return text
    return set_cell_size(text, max(cells - 1, 0)) + "…"


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, dict) and set(value) == set(BOX_CORNERS):  # an evidence box: x0,y0,x1,y1
        return ",".join(f"{value[corner]:.3f}" for corner in BOX_CORNERS)
    return " ".join(str(value).split())  # newlines would break the alignment


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _rows(batch: pa.RecordBatch, layout: TableLayout) -> list[list[str]]:
    shorten = layout.shorten or {}
    rows = []
    for row in batch.to_pylist():
        cells = []
        for name, value in row.items():
            text = _text(value)
            if name in shorten and text:
                text = shorten[name](text)
            cells.append(text if layout.wide else _fit(text, MAX_CELL_CHARS))
        rows.append(cells)
    return rows


def column_widths(headers: list[int], values: list[int], width: int | None) -> list[int] | None:
    """Each column's width (``headers``: its header's cells; ``values``: its widest value's): as wide as both;
    when the table is wider than ``width``, first the headers longer than their values are cut (down to
    their values, or MIN_COLUMN_CELLS), then the widest columns are narrowed, a cell at a time, never below
    MIN_COLUMN_CELLS. None when even that does not fit (the rows are then shown one field per line)."""
    widths = [max(header, value) for header, value in zip(headers, values, strict=True)]
    if width is None:
        return widths
    gaps = len(GAP) * (len(widths) - 1)
    floors = [min(cells, MIN_COLUMN_CELLS) for cells in widths]
    if sum(floors) + gaps > width:
        return None
    for stage_floors in ([max(value, floor) for value, floor in zip(values, floors, strict=True)], floors):
        while sum(widths) + gaps > width:
            widest = max(range(len(widths)), key=lambda i: (widths[i] - stage_floors[i], widths[i]))
            if widths[widest] <= stage_floors[widest]:
                break
            widths[widest] -= 1
    return widths


def _line(cells: list[str], widths: list[int]) -> str:
    return GAP.join(set_cell_size(_fit(cell, width), width) for cell, width in zip(cells, widths, strict=True))


def write_table_text(reader: pa.RecordBatchReader, stream: IO[str], layout: TableLayout | None = None) -> int:
    """An aligned text table fitted to ``layout.width``: its widest columns narrowed (their cells cut,
    "…"), or, when its columns cannot fit even narrowed, each row as a block of "column  value" lines (as
    psql's expanded display). Column widths come from all rows: the result is spooled to a temporary Arrow
    file while they are measured (never held in memory whole), then printed from it. Returns the number
    of rows."""
    layout = layout or TableLayout()
    names = reader.schema.names
    values = [0] * len(names)
    with tempfile.TemporaryFile() as spool:
        with pa.ipc.new_file(spool, reader.schema) as writer:
            for batch in reader:
                for row in _rows(batch, layout):
                    values = [max(width, cell_len(cell)) for width, cell in zip(values, row, strict=True)]
                writer.write_batch(batch)
        spool.seek(0)
        spooled = pa.ipc.open_file(spool)
        rows = (row for index in range(spooled.num_record_batches) for row in _rows(spooled.get_batch(index), layout))
        widths = column_widths([cell_len(name) for name in names], values, layout.width)
        if widths is None:
            count = _write_expanded(names, rows, layout.width or 80, stream)
        else:
            stream.write(_line(names, widths) + "\n")
            stream.write(GAP.join("-" * width for width in widths) + "\n")
            count = 0
            for row in rows:
                stream.write(_line(row, widths) + "\n")
                count += 1
    stream.write(f"({count} row{'s' if count != 1 else ''})\n")
    return count


def _write_expanded(names: list[str], rows, width: int, stream: IO[str]) -> int:
    """Each row as a block: a rule naming the row, then one "column  value" line per column."""
    label = max(cell_len(name) for name in names)
    count = 0
    for count, row in enumerate(rows, start=1):
        stream.write(_fit(f"-[ row {count} ]" + "-" * width, width)[:-1] + "-\n")
        for name, cell in zip(names, row, strict=True):
            stream.write(
                f"{set_cell_size(_fit(name, label), label)}{GAP}{_fit(cell, max(width - label - len(GAP), 1))}\n"
            )
    return count


def write_result(
    reader: pa.RecordBatchReader,
    output_format: str,
    text: IO[str],
    binary: IO[bytes],
    layout: TableLayout | None = None,
) -> int:
    """Write ``reader`` in ``output_format`` (one of FORMATS); returns the number of rows written. ``layout``
    applies to the text table only: the other formats keep every value whole."""
    if output_format == "table":
        return write_table_text(reader, text, layout)
    count = 0
    if output_format == "json":  # JSON lines: one object per row
        for batch in reader:
            for row in batch.to_pylist():
                text.write(json.dumps(row, default=_json_default, ensure_ascii=False) + "\n")
            count += batch.num_rows
        return count
    text.flush()
    writer_type = {"csv": pacsv.CSVWriter, "parquet": pq.ParquetWriter}[output_format]
    with writer_type(binary, reader.schema) as writer:
        for batch in reader:
            writer.write_batch(batch)
            count += batch.num_rows
    binary.flush()
    return count
