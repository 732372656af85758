"""The record that flows between the stages, and the rows it becomes.

A document row (read stage) becomes page rows (rasterize stage: one per rendered page, or one for the whole
document saying why it has none), then split page rows (PAGE_SCHEMA, what the model actor receives), then
output rows (OUTPUT_SCHEMA: one per document x page x question, or one saying why not). Every stage builds
its rows with the constructors here. Missing values are None (null) everywhere; a row with no page number
speaks for the whole document.
"""

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


class DocumentError(Exception):
    """A document- or page-level failure with its status: the one exception that crosses the render
    helper's process boundary (it pickles whole)."""

    def __init__(self, status: Status | str, reason: str) -> None:
        super().__init__(Status(status), reason)
        self.status = Status(status)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


# Failures worth retrying in a later run of the same document version; the others are final for it.
RETRYABLE = frozenset({Status.READ_ERROR, Status.MODEL_ERROR})


# Carried from the read stage to every row of the document.
DOCUMENT_FIELDS = ("uri", "file_size", "source_version", "etag", "version_id", "sha256")

BBOX = pa.struct([(corner, pa.float64()) for corner in ("x0", "y0", "x1", "y1")])
# A page's text layer: its words in reading order and their boxes (x0, y0, x1, y1 each, fractions of the page).
TEXT_LAYER_FIELDS = [("words", pa.list_(pa.string())), ("word_boxes", pa.list_(pa.float32()))]

# The split stage's rows, as the actor receives them.
PAGE_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("file_size", pa.int64()),
        ("source_version", pa.string()),
        ("etag", pa.string()),
        ("version_id", pa.string()),
        ("sha256", pa.string()),
        ("num_pages", pa.int64()),
        ("page_number", pa.int64()),  # null: the row speaks for the whole document
        ("question_ids", pa.list_(pa.string())),  # the questions that apply to this page, in config order
        ("document_rows", pa.int64()),  # output rows the document will have: the writer's completeness check
        ("repaired", pa.bool_()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("render_ms", pa.float64()),
        # The page's own text layer (pipeline/pdf.py TextLayer): its words and their boxes for evidence, its
        # text where a question may be answered from it, and whether it is usable for `source: auto`.
        ("text", pa.string()),
        *TEXT_LAYER_FIELDS,
        ("text_layer_chars", pa.int64()),
        ("text_usable", pa.bool_()),
        ("sub_images", pa.binary()),
        ("sub_image_shapes", pa.list_(pa.int64())),
    ]
)

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
        # Typed answers (pipeline/values.py): the value in its type's column, and whether it was read.
        pa.field("value_number", pa.float64()),
        pa.field("value_currency", pa.string()),  # ISO 4217
        pa.field("value_date", pa.date32()),
        pa.field("value_boolean", pa.bool_()),
        pa.field("value_status", pa.string()),  # parsed, unparsed (why in error), null for text questions
        # Where the answer came from, and where it is on the page (pipeline/text_layer.py).
        pa.field("answer_source", pa.string()),  # model or text_layer
        pa.field("evidence", pa.string()),  # text_layer: found in the page's text layer; none: not found
        pa.field("evidence_text", pa.string()),  # the page's words that matched the answer
        pa.field("evidence_bbox", BBOX),  # their bounding box, as fractions of the page's width and height
        pa.field("text_layer_chars", pa.int32()),  # non-space characters of the page's text layer; 0: a scan
    ]
)


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts with any subset of the output columns) as a table of exactly OUTPUT_SCHEMA."""
    return pa.Table.from_pylist(
        [{name: row.get(name) for name in OUTPUT_SCHEMA.names} for row in rows], schema=OUTPUT_SCHEMA
    )


def file_name_of(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def document_row(
    uri: str,
    file_size: int,
    source_version: str | None = None,
    etag: str | None = None,
    version_id: str | None = None,
    sha256: str | None = None,
    data: bytes = b"",
) -> dict[str, Any]:
    """A read document: its identity and bytes, status ok until a stage says otherwise."""
    return {
        "uri": uri,
        "file_size": file_size,
        "source_version": source_version,
        "etag": etag,
        "version_id": version_id,
        "sha256": sha256,
        "data": data,
        "status": Status.OK.value,
        "error": None,
    }


def failed(row: dict[str, Any], status: Status, reason: str) -> dict[str, Any]:
    """The row, failed with ``status`` for ``reason``."""
    return {**row, "status": status.value, "error": reason}


def page_row(document: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A rasterized page of ``document`` (or, without a page number, the row that speaks for all of it)."""
    return {
        **{field: document[field] for field in DOCUMENT_FIELDS},
        "num_pages": None,
        "page_number": None,
        "question_ids": [],
        "document_rows": 1,
        "repaired": False,
        "status": document["status"],
        "error": document["error"],
        "render_ms": None,
        "text": None,
        "words": [],
        "word_boxes": [],
        "text_layer_chars": None,
        "text_usable": False,
        "image": None,  # the rendered page, (H, W, 3) uint8; None where no question needs the model
        **fields,
    }


def output_rows(page: dict[str, Any], questions: list[Any], **fields: Any) -> list[dict[str, Any]]:
    """A split page's output rows: one per question (``QuestionTemplate``, text filled in), or the single
    row of a document that failed as a whole. ``fields`` sets the rest (run, model, answer columns)."""
    base = {
        "document": page["uri"],
        **{field: page[field] for field in DOCUMENT_FIELDS if field != "uri"},
        **{field: page[field] for field in ("document_rows", "repaired", "page_number", "num_pages")},
        "text_layer_chars": page["text_layer_chars"],
        "status": page["status"],
        "error": page["error"],
        "render_ms": page["render_ms"],
        **fields,
    }
    if base["page_number"] is None:
        return [base]
    file_name = file_name_of(base["document"])
    return [
        {
            **base,
            "question_id": question.id,
            "question": question.question(file_name, base["page_number"], base["num_pages"]),
        }
        for question in questions
    ]
