"""Writing a stream of Arrow record batches for people (an aligned table) or for scripts (CSV, JSON lines,
Parquet), batch by batch: a large result is never held in memory whole."""

from __future__ import annotations

import json
from datetime import date, datetime
from typing import IO, Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

FORMATS = ("table", "csv", "json", "parquet")
MAX_CELL_CHARS = 60


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return _fit(" ".join(str(value).split()), MAX_CELL_CHARS)  # newlines would break the alignment


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def write_table_text(reader: pa.RecordBatchReader, stream: IO[str]) -> int:
    """An aligned text table; column widths come from the header and the first batch, later cells are
    cut to fit (a long result streams instead of being measured first). Returns the number of rows."""
    names = reader.schema.names
    widths: list[int] | None = None
    count = 0
    for batch in reader:
        rows = [[_cell(value) for value in row.values()] for row in batch.to_pylist()]
        if widths is None:
            widths = [max([len(name), *(len(row[i]) for row in rows)]) for i, name in enumerate(names)]
            stream.write("  ".join(name.ljust(width) for name, width in zip(names, widths, strict=True)).rstrip())
            stream.write("\n" + "  ".join("-" * width for width in widths) + "\n")
        for row in rows:
            cells = (_fit(cell, width).ljust(width) for cell, width in zip(row, widths, strict=True))
            stream.write("  ".join(cells).rstrip() + "\n")
        count += len(rows)
    if widths is None:
        stream.write("  ".join(names) + "\n")
    stream.write(f"({count} row{'s' if count != 1 else ''})\n")
    return count


def write_result(reader: pa.RecordBatchReader, output_format: str, text: IO[str], binary: IO[bytes]) -> int:
    """Write ``reader`` in ``output_format`` (one of FORMATS); returns the number of rows written."""
    if output_format == "table":
        return write_table_text(reader, text)
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
