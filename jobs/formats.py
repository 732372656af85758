"""Writing a stream of Arrow record batches for people (an aligned table) or for scripts (CSV, JSON lines,
Parquet), batch by batch: a large result is never held in memory whole."""

from __future__ import annotations

import json
import tempfile
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


def _rows(batch: pa.RecordBatch) -> list[list[str]]:
    return [[_cell(value) for value in row.values()] for row in batch.to_pylist()]


def write_table_text(reader: pa.RecordBatchReader, stream: IO[str]) -> int:
    """An aligned text table, every line as wide as the others and every cell cut at MAX_CELL_CHARS.
    Column widths come from all rows: the result is spooled to a temporary Arrow file while they are
    measured (never held in memory whole), then printed from it. Returns the number of rows."""
    names = reader.schema.names
    widths = [len(name) for name in names]
    with tempfile.TemporaryFile() as spool:
        with pa.ipc.new_file(spool, reader.schema) as writer:
            for batch in reader:
                for row in _rows(batch):
                    widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]
                writer.write_batch(batch)
        spool.seek(0)
        spooled = pa.ipc.open_file(spool)
        stream.write("  ".join(name.ljust(width) for name, width in zip(names, widths, strict=True)) + "\n")
        stream.write("  ".join("-" * width for width in widths) + "\n")
        count = 0
        for index in range(spooled.num_record_batches):
            for row in _rows(spooled.get_batch(index)):
                stream.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + "\n")
                count += 1
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
