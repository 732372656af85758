"""The records that cross the stage boundaries, one per boundary, and their Arrow schemas, derived from the
records' fields (never written beside them):

    listing ──DocumentRef──▶ planning ──RenderBatch──▶ rendering ──Page──▶ answering ──AnswerRow──▶ writing
                             (reads it into a Document: what an upload to `docqa serve` also becomes; plans
                             it into WorkUnits, a long document's page ranges or a small document whole, and
                             hands them on a render task's worth at a time)

One name per field from end to end: the names of the output columns (``document``, ``file_size``,
``source_version`` ...). A row's ``scope`` says whether it answers a question on a page (``page``) or speaks
for its whole document (``document``: the document failed as a whole, or a page range of it did); no stage
reads "no page number" as anything. Every record says its ``status``: anything but ``ok`` comes with a
readable ``error``, and a failure travels on as a record, never as an exception.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable
from enum import StrEnum
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from pipeline.record_schema import arrow, schema_of, to_table


class Status(StrEnum):
    """Row status. Anything but ``ok`` comes with a readable ``error``."""

    OK = "ok"
    UNSUPPORTED_FORMAT = "unsupported_format"  # not a PDF nor an image docqa reads (by content, never by name)
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


# Failures worth retrying in a later run of the same document version; the others are final for it.
RETRYABLE = frozenset({Status.READ_ERROR, Status.MODEL_ERROR})
# Statuses of earlier versions, taken again by the next run: ``not_pdf`` (images are read since).
RETIRED_STATUSES = frozenset({"not_pdf"})
Scope = Literal["page", "document"]
PAGE: Scope = "page"
DOCUMENT: Scope = "document"


class DocumentError(Exception):
    """A document- or page-level failure with its status: what the render helper reports, and what the
    stages turn into a failed record."""

    def __init__(self, status: Status | str, reason: str) -> None:
        super().__init__(Status(status), reason)
        self.status = Status(status)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


BBOX = pa.struct([(corner, pa.float64()) for corner in ("x0", "y0", "x1", "y1")])
# A field of a record in a list or object answer (pipeline/structured.py): which record of the answer it
# belongs to, its text, typed value and evidence, as an answer row has them.
ITEM_ENTRY = pa.struct(
    [
        ("record", pa.int32()),
        ("field", pa.string()),
        ("answer", pa.string()),
        ("value_number", pa.float64()),
        ("value_currency", pa.string()),
        ("value_date", pa.date32()),
        ("value_boolean", pa.bool_()),
        ("value_status", pa.string()),
        ("evidence", pa.string()),
        ("evidence_text", pa.string()),
        ("evidence_bbox", BBOX),
    ]
)

# The fields that identify a document and its version, carried from the listing to every output row.
IDENTITY = ("document", "file_size", "source_version", "etag", "version_id", "sha256")


@dataclasses.dataclass(frozen=True, slots=True)
class DocumentRef:
    """Listing → planning: a document found by listing. ``file_size`` is -1 when unknown (a URI from a list
    file). ``source_version`` tells whether it changed since a committed run: the ETag on S3, size and
    modification time on a local disk; a URI from a list file learns it when it is read."""

    document: str
    file_size: int
    etag: str | None = None
    source_version: str | None = None


@dataclasses.dataclass(slots=True)
class Document:
    """A document read (planning's first step; an upload to `docqa serve`): its identity, its bytes, and its
    status so far (``read_error``, ``file_too_large`` ... before any parser saw it)."""

    document: str
    file_size: int
    source_version: str | None = None
    etag: str | None = None
    version_id: str | None = None
    sha256: str | None = None
    data: bytes = b""
    status: str = Status.OK.value
    error: str | None = None

    def failed(self, status: Status, reason: str) -> Document:
        return dataclasses.replace(self, status=status.value, error=reason, data=b"")


@dataclasses.dataclass(slots=True)
class WorkUnit:
    """Planning → rendering: one page range of a document to render, with the questions that apply to each
    of its pages (decided once, in planning); or, with a status, the one unit that says why the document has
    no pages to render. ``data`` is null when the unit reads the document again (a long document's ranges do:
    its bytes are not copied once per range)."""

    document: str
    file_size: int | None
    source_version: str | None
    etag: str | None
    version_id: str | None
    sha256: str | None
    status: str
    error: str | None
    num_pages: int | None
    repaired: bool
    source_format: str | None  # pdf, tiff, png, jpeg ... (pipeline/formats.py); null before it was opened
    data: bytes | None
    pages: list[int]  # the pages of this range that some question applies to, in order
    question_ids: list[list[str]]  # for each of ``pages``, the questions that apply to it, in config order
    document_rows: int  # output rows the document will have: one per (page, question), or one for a failure
    ranges: int  # the document's number of units

    @property
    def span(self) -> str:
        """Which part of its document a unit is, in a failure's reason ("pages 65-128: "), when it has several."""
        return f"pages {self.pages[0]}-{self.pages[-1]}: " if self.ranges > 1 and self.pages else ""


@dataclasses.dataclass(slots=True)
class RenderBatch:
    """Planning → rendering: what one render task takes. One range of a long document (its ranges render in
    parallel, each in a task of its own), or the units of several documents of one range each, together at
    most ``render.range_pages`` pages: a Ray task costs tens of milliseconds, a one-page document a few, so
    small documents share their tasks."""

    units: list[WorkUnit]


@dataclasses.dataclass(slots=True)
class Page:
    """Rendering → answering: a page with its questions, each marked as answered by the model or from the
    page's text layer (decided once, in rendering, where the text layer is read), its text layer (text, words
    and their boxes as fractions of the page) and its sub-images as the model takes them (raw uint8, packed,
    with their shapes). Or, with ``scope`` ``document``, the one record that speaks for a whole document."""

    document: str
    file_size: int | None
    source_version: str | None
    etag: str | None
    version_id: str | None
    sha256: str | None
    scope: Scope = dataclasses.field(metadata=arrow(pa.string(), nullable=False))
    num_pages: int | None
    page_number: int | None
    question_ids: list[str]
    by_model: list[bool]  # for each of ``question_ids``: the model answers it (else the page's text layer)
    document_rows: int
    repaired: bool
    status: str
    error: str | None
    source_format: str | None = None
    page_dpi: float | None = None  # an image page's resolution, where its header states one
    render_ms: float | None = None
    text_source: str | None = None  # where text and words come from: text_layer (the PDF's own), ocr, or none
    text: str | None = None  # the page's text, where a question is answered from it
    words: list[str] = dataclasses.field(default_factory=list)
    word_boxes: list[float] = dataclasses.field(default_factory=list, metadata=arrow(pa.list_(pa.float32())))
    text_layer_chars: int | None = None  # non-space characters of the text (PDF's or OCR's): 0 for a scan without
    text_usable: bool = False  # whether the text can stand for the page (pipeline/text_layer.py)
    sub_images: Any = dataclasses.field(  # a numpy uint8 buffer as rendered, bytes as read back from a table
        default_factory=lambda: np.empty(0, dtype=np.uint8), metadata=arrow(pa.binary(), zero_copy=True)
    )
    sub_image_shapes: list[int] = dataclasses.field(default_factory=list)  # [h0, w0, h1, w1, ...]

    @property
    def asks_the_model(self) -> bool:
        return any(self.by_model)


@dataclasses.dataclass(slots=True)
class AnswerRow:
    """Answering → writing: one output row, a question answered on a page, or the row of a document (or a
    page) that has no answer and says why. Its schema is the output tables' (pipeline/tables.py)."""

    run_id: str = dataclasses.field(metadata=arrow(pa.string(), nullable=False))
    document: str = dataclasses.field(metadata=arrow(pa.string(), nullable=False))
    file_size: int | None = None
    source_version: str | None = None
    config_fingerprint: str | None = None
    document_rows: int | None = dataclasses.field(default=None, metadata=arrow(pa.int32()))
    etag: str | None = None
    version_id: str | None = None
    sha256: str | None = None
    repaired: bool | None = None
    page_number: int | None = dataclasses.field(default=None, metadata=arrow(pa.int32()))
    num_pages: int | None = dataclasses.field(default=None, metadata=arrow(pa.int32()))
    question_id: str | None = None
    question: str | None = None
    answer: str | None = None
    confidence: float | None = None
    generated_tokens: int | None = dataclasses.field(default=None, metadata=arrow(pa.int32()))
    model_id: str | None = None
    model_revision: str | None = None
    status: str = dataclasses.field(default=Status.OK.value, metadata=arrow(pa.string(), nullable=False))
    error: str | None = None
    render_ms: float | None = None
    model_ms: float | None = None
    # Typed answers (pipeline/values.py): the value in its type's column, and whether it was read.
    value_number: float | None = None
    value_currency: str | None = None  # ISO 4217
    value_date: datetime.date | None = None
    value_boolean: bool | None = None
    value_status: str | None = None  # parsed, unparsed (why in error), null for text questions
    # Where the answer came from, and where it is on the page (pipeline/text_layer.py).
    answer_source: str | None = None  # model, text_layer (the PDF's own text) or ocr
    evidence: str | None = None  # text_layer or ocr: found in the page's words from there; none: not found
    evidence_text: str | None = None  # the page's words that matched the answer
    evidence_bbox: dict[str, float] | None = dataclasses.field(default=None, metadata=arrow(BBOX))
    text_layer_chars: int | None = dataclasses.field(default=None, metadata=arrow(pa.int32()))
    scope: str | None = None  # page: a question on a page; document: the row speaks for its whole document
    # What the page came from (pipeline/formats.py): the document's format, an image page's resolution, and
    # where the page's words came from (text_layer, ocr, or null: none were read).
    source_format: str | None = None
    page_dpi: float | None = dataclasses.field(default=None, metadata=arrow(pa.float32()))
    text_source: str | None = None
    # A list or object answer's records, field by field (empty for other questions): what the `items` table
    # is made of (pipeline/structured.py ``document_items``).
    items: list[dict[str, Any]] = dataclasses.field(default_factory=list, metadata=arrow(pa.list_(ITEM_ENTRY)))


@dataclasses.dataclass(slots=True)
class ItemRow:
    """A row of the ``items`` table: one field of one record of a list or object answer, ``item`` its
    record's number in the document's list (from 0, across its pages in order)."""

    document: str = dataclasses.field(metadata=arrow(pa.string(), nullable=False))
    page_number: int = dataclasses.field(metadata=arrow(pa.int32(), nullable=False))
    question_id: str = dataclasses.field(metadata=arrow(pa.string(), nullable=False))
    item: int = dataclasses.field(metadata=arrow(pa.int32(), nullable=False))
    field: str = dataclasses.field(metadata=arrow(pa.string(), nullable=False))
    answer: str | None
    value_number: float | None
    value_currency: str | None
    value_date: datetime.date | None
    value_boolean: bool | None
    value_status: str | None
    evidence: str | None
    evidence_text: str | None
    evidence_bbox: dict[str, float] | None = dataclasses.field(metadata=arrow(BBOX))
    run_id: str | None
    config_fingerprint: str | None


REF_SCHEMA = schema_of(DocumentRef)
UNIT_SCHEMA = schema_of(WorkUnit)
BATCH_SCHEMA = schema_of(RenderBatch)
PAGE_SCHEMA = schema_of(Page)
OUTPUT_SCHEMA = schema_of(AnswerRow)
ITEM_SCHEMA = schema_of(ItemRow)


@dataclasses.dataclass(slots=True)
class ReviewRow:
    """A row of the ``reviews`` table: what a person decided about one answer (or one field of a record),
    and what was under review. A review speaks for the document's version it was made on
    (``source_version``): a document reprocessed into a different answer goes back to the queue."""

    review_id: str = dataclasses.field(metadata=arrow(pa.string(), nullable=False))
    document: str = dataclasses.field(metadata=arrow(pa.string(), nullable=False))
    source_version: str | None
    page_number: int | None = dataclasses.field(metadata=arrow(pa.int32()))
    question_id: str | None
    item: int | None = dataclasses.field(metadata=arrow(pa.int32()))
    field: str | None
    decision: str = dataclasses.field(metadata=arrow(pa.string(), nullable=False))  # accepted, corrected, rejected
    answer: str | None  # the answer decided: the one reviewed (accepted), the correction, or null (rejected)
    value_number: float | None
    value_currency: str | None
    value_date: datetime.date | None
    value_boolean: bool | None
    value_status: str | None  # of the answer decided: parsed, unparsed, or null (a text question)
    reviewed_answer: str | None  # the answer as it was under review
    reviewed_confidence: float | None
    run_id: str | None
    config_fingerprint: str | None
    reviewer: str | None
    reviewed_at: datetime.datetime = dataclasses.field(metadata=arrow(pa.timestamp("us", tz="UTC"), nullable=False))
    origin: str = dataclasses.field(metadata=arrow(pa.string(), nullable=False))  # docqa-review, label-studio


REVIEW_SCHEMA = schema_of(ReviewRow)


def rows_to_table(rows: Iterable[AnswerRow | dict[str, Any]]) -> pa.Table:
    """Answer rows (records, or dicts with any subset of the output columns) as a table of OUTPUT_SCHEMA."""
    return to_table([row if isinstance(row, AnswerRow) else AnswerRow(**row) for row in rows], AnswerRow)


def file_name_of(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]
