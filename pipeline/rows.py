"""Statuses and the output row schema: one row per document x page x question, or one row saying why not."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import pyarrow as pa


class Status(StrEnum):
    """Row status. Anything but ``ok`` comes with a readable ``error``."""

    OK = "ok"
    NOT_PDF = "not_pdf"  # the bytes are not a PDF (checked by content, not by name)
    CORRUPT = "corrupt"  # MuPDF / poppler cannot open it
    ENCRYPTED = "encrypted"  # needs a password
    EMPTY = "empty"  # opens with 0 pages, or a 0-byte file
    TOO_MANY_PAGES = "too_many_pages"  # over limits.max_pages_per_document
    FILE_TOO_LARGE = "file_too_large"  # over limits.max_file_bytes
    PAGE_TOO_LARGE = "page_too_large"  # over limits.max_pixels_per_page at the render resolution
    NO_APPLICABLE_PAGES = "no_applicable_pages"  # no question applies to any of its pages
    READ_ERROR = "read_error"  # the file could not be read from storage
    RENDER_ERROR = "render_error"  # the page could not be rasterized, or the renderer died on it
    TIMEOUT = "timeout"  # opening and rendering took longer than limits.document_timeout_s
    MEMORY_LIMIT = "memory_limit"  # the renderer needed more than limits.render_memory_mb
    MODEL_ERROR = "model_error"  # the model failed on this page
    DEFERRED = "deferred"  # over this run's page budget: not written, picked up by the next run


class DocumentError(Exception):
    """A document- or page-level failure with its status."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# Failures worth retrying in a later run of the same document version; the others are final for it.
RETRYABLE = frozenset({Status.READ_ERROR, Status.MODEL_ERROR, Status.DEFERRED})


OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("document", pa.string(), nullable=False),
        pa.field("file_size", pa.int64()),
        pa.field("source_version", pa.string()),
        pa.field("config_fingerprint", pa.string()),
        pa.field("document_rows", pa.int32()),
        pa.field("etag", pa.string()),
        pa.field("version_id", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("repaired", pa.bool_()),
        pa.field("page_number", pa.int32()),
        pa.field("num_pages", pa.int32()),
        pa.field("question_id", pa.string()),
        pa.field("question", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("confidence", pa.float64()),
        pa.field("generated_tokens", pa.int32()),
        pa.field("model_id", pa.string()),
        pa.field("model_revision", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("render_ms", pa.float64()),
        pa.field("model_ms", pa.float64()),
    ]
)


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts with any subset of the output columns) as a table of exactly OUTPUT_SCHEMA."""
    return pa.Table.from_pylist(
        [{name: row.get(name) for name in OUTPUT_SCHEMA.names} for row in rows], schema=OUTPUT_SCHEMA
    )
