"""The planning stage: listed documents → their work units, a render task's worth at a time
(``PlanDocuments``, one task per batch of listed documents).

Each document is read (``ReadDocument``: its bytes and their hash, refused over ``limits.max_file_bytes``
without being read), opened in the render helper to count its pages, and planned: the questions that apply
to each page are decided here, once, and the pages some question applies to are cut into ranges of at most
``render.range_pages``, one work unit each, so that a long document is rendered by several tasks at once.
A document that cannot be opened, has too many pages or no page to answer is one failed unit; one over the
run's page budget is none (the ledger counts it; the next run picks it up).

A document of one unit travels with its bytes; the units of a longer document carry none and each reads
the document again (the same limits and version: a changed file fails the document with ``read_error``),
so that a 2,000-page document is not copied once per range through the object store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import pyarrow as pa

from pipeline.config import JobConfig, LimitsConfig, StorageConfig
from pipeline.ledger import report_isolation
from pipeline.record_schema import from_table, to_table
from pipeline.records import (
    IDENTITY,
    Document,
    DocumentError,
    DocumentRef,
    RenderBatch,
    Status,
    WorkUnit,
)
from pipeline.sandbox import open_document
from pipeline.storage import describe_client_error, read_object


def document_of_bytes(uri: str, data: bytes) -> Document:
    """A document that arrived as bytes (an upload): its content hash stands for its version."""
    digest = hashlib.sha256(data).hexdigest()
    return Document(uri, len(data), source_version=digest, sha256=digest, data=data)


class ReadDocument:
    """Reads a listed document's bytes and hashes them; refuses files over the size limit without reading
    them. The ETag and version id recorded are the ones returned with the bytes that were hashed."""

    def __init__(self, limits: LimitsConfig, storage: StorageConfig) -> None:
        self.limits = limits
        self.storage = storage

    def __call__(self, ref: DocumentRef) -> Document:
        document = Document(ref.document, ref.file_size, ref.source_version or None, ref.etag or None)
        limit = self.limits.max_file_bytes
        if document.file_size > limit:
            return self._too_large(document, document.file_size)
        try:
            read = read_object(ref.document, self.storage, limit)
        except Exception as error:  # noqa: BLE001 - any storage failure becomes this document's record
            return document.failed(Status.READ_ERROR, describe_client_error(error, f"cannot read {ref.document}"))
        document.file_size = read.size
        document.etag = read.etag or document.etag
        document.version_id = read.version_id or None
        document.source_version = document.source_version or document.etag  # a list file's URI learns it here
        if read.size > limit:
            return self._too_large(document, read.size)
        document.data, document.sha256 = read.data, hashlib.sha256(read.data).hexdigest()
        return document

    def _too_large(self, document: Document, size: int) -> Document:
        limit = self.limits.max_file_bytes
        return document.failed(Status.FILE_TOO_LARGE, f"file is {size} bytes, over limits.max_file_bytes={limit}")


def unit_of(document: Document, **fields) -> WorkUnit:
    """A work unit of ``document``: its identity, and ``fields`` (by default: ok, no pages, one row)."""
    defaults = {"status": Status.OK.value, "error": None, "num_pages": None, "repaired": False, "data": None}
    defaults |= {"source_format": None}
    defaults |= {"pages": [], "question_ids": [], "document_rows": 1, "ranges": 1}
    identity = {name: getattr(document, name) for name in IDENTITY}
    return WorkUnit(**identity, **(defaults | fields))


def failed_unit(
    document: Document,
    status: Status | str,
    reason: str,
    num_pages: int | None = None,
    source_format: str | None = None,
) -> WorkUnit:
    """The one unit that says why a document has no pages to render."""
    status = Status(status).value
    return unit_of(document, status=status, error=reason, num_pages=num_pages, source_format=source_format)


class Planner:
    """A read document → its work units (see the module's docstring)."""

    def __init__(self, config: JobConfig, ledger=None) -> None:
        self.config = config
        self.ledger = ledger  # the run's ledger: its page budget, and how the render helpers are isolated
        self.report_isolation = report_isolation(ledger)

    def plan(self, document: Document) -> list[WorkUnit]:
        if document.status != Status.OK:
            return [failed_unit(document, document.status, document.error or "")]
        try:
            opened = open_document(document.data, self.config.render, self.config.limits, self.report_isolation)
        except DocumentError as error:
            return [failed_unit(document, error.status, error.reason)]
        opened.close()
        num_pages, limits = opened.num_pages, self.config.limits
        if num_pages > limits.max_pages_per_document:
            reason = f"{num_pages} pages, over limits.max_pages_per_document={limits.max_pages_per_document}"
            return [failed_unit(document, Status.TOO_MANY_PAGES, reason, num_pages, opened.source_format)]
        asked = [[q.id for q in self.config.questions_for_page(page, num_pages)] for page in range(1, num_pages + 1)]
        pages = [page for page, questions in enumerate(asked, start=1) if questions]
        if not pages:
            reason = f"no question applies to any of its {num_pages} page(s)"
            return [failed_unit(document, Status.NO_APPLICABLE_PAGES, reason, num_pages, opened.source_format)]
        if self.ledger is not None and self.config.budget.max_pages is not None:
            import ray

            if not ray.get(self.ledger.take_pages.remote(len(pages))):
                return []  # over this run's page budget: counted by the ledger, left for the next run
        size = self.config.render.range_pages
        starts = range(0, len(pages), size)
        # Every (page, question) gets exactly one row, answered or not: the writer uses this to know a
        # document is complete.
        rows = sum(len(questions) for questions in asked)
        return [
            unit_of(
                document,
                num_pages=num_pages,
                repaired=opened.repaired,
                source_format=opened.source_format,
                data=document.data,
                pages=pages[start : start + size],
                question_ids=[asked[page - 1] for page in pages[start : start + size]],
                document_rows=rows,
                ranges=len(starts),
            )
            for start in starts
        ]


def render_batches(documents: Iterable[list[WorkUnit]], range_pages: int) -> list[RenderBatch]:
    """Documents' work units as render tasks' worth: each range of a document of several its own batch; the
    documents of one unit together, up to ``range_pages`` pages a batch (a failed unit, no page to render,
    weighs one), so that a render task renders about as much for a bucket of one-page invoices as for a
    range of a long report."""
    batches: list[RenderBatch] = []
    small: list[WorkUnit] = []
    weight = 0
    for units in documents:
        if len(units) > 1:
            batches += [RenderBatch([unit]) for unit in units]
            continue
        for unit in units:
            unit_weight = max(1, len(unit.pages))
            if small and weight + unit_weight > range_pages:
                batches.append(RenderBatch(small))
                small, weight = [], 0
            small.append(unit)
            weight += unit_weight
    if small:
        batches.append(RenderBatch(small))
    return batches


class PlanDocuments:
    """The planning stage: a batch of listed documents (DocumentRef) → their work units, a render task's
    worth a row (RenderBatch, ``render_batches``)."""

    def __init__(self, config: JobConfig, ledger=None) -> None:
        self.read = ReadDocument(config.limits, config.storage)
        self.planner = Planner(config, ledger)
        self.range_pages = config.render.range_pages

    def __call__(self, listed: pa.Table) -> pa.Table:
        documents: list[list[WorkUnit]] = []
        for ref in from_table(listed, DocumentRef):
            planned = self.planner.plan(self.read(ref))
            if len(planned) > 1:  # each range reads the document again (see the module's docstring)
                for unit in planned:
                    unit.data = None
            documents.append(planned)
        return to_table(render_batches(documents, self.range_pages), RenderBatch)
