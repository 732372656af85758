"""The rendering stage: work units → their pages (``RenderPages``, one task per render batch: a range of a
long document, or several small documents), handed on in tables of at most ``PAGE_ROW_ALLOWANCE`` or of one
page that is larger (a page with images goes on as soon as it is rendered), so that Ray closes a block at
the run's byte budget (``render.block_mb``) and a task's memory does not grow with the document.

For each page of its unit the helper reads the page's text layer (a PDF's own; an image has none). Where it
is not usable and a question needs the page's words (to answer from text, or to find a typed answer's
evidence: ``needs_words``), the page is OCR'd (``ocr`` section) in the document's second helper while the
first renders it, and the OCR's words stand for the text layer from then on. Then, once, each question of
the page is given to the model or to the page's text (``source: auto`` takes the text where it is usable).
Only a page some question needs the model for is rendered, at the resolution the model keeps, and split into
the sub-images the model takes (pipeline/images.py). Before any pixel is made (rendered, OCR'd or decoded
from an image file) the page's size is checked against the limits. A page that cannot be read becomes the
record of that page with its status; a unit that fails as a whole (its time or memory limit, its re-read)
becomes one record for the whole document (``scope`` ``document``), which the writer keeps alone however
many of the document's rows it had. Nothing raises out of the stage.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import JobConfig, LimitsConfig, OcrConfig
from pipeline.confinement import OcrUnavailable, tessdata_directory
from pipeline.helper_protocol import HelperException
from pipeline.images import ImageGeometry, pack_images, split_page
from pipeline.ledger import report_isolation
from pipeline.pdf import rendered_size
from pipeline.planning import Planner, ReadDocument
from pipeline.questions import QuestionTemplate
from pipeline.record_schema import from_table, to_table
from pipeline.records import (
    DOCUMENT,
    IDENTITY,
    PAGE,
    Document,
    DocumentError,
    DocumentRef,
    Page,
    RenderBatch,
    Status,
    WorkUnit,
)
from pipeline.sandbox import SandboxedDocument, open_document
from pipeline.text_layer import OCR, TEXT_LAYER, is_usable
from pipeline.words import NO_TEXT_LAYER

TYPED_EVIDENCE = ("number", "money", "date")  # types whose answers OCR is run for, to find their evidence
# Beside its sub-images, a page record's other columns (identity, question ids, shapes, its text layer's text,
# words and boxes) take at most this for any ordinary page (a dense page of 10,000 words takes ~300 KiB); pages
# are handed on together up to this much (a table a page cost more than reading a small page's text).
PAGE_ROW_ALLOWANCE = 1024 * 1024


def page_limit_violation(page: dict[str, Any], longest_edge: int | None, limits: LimitsConfig) -> str | None:
    """Why a page must not be rendered (checked from its size and, for an image, the pixel count its header
    states, before any pixel exists), or None. ``longest_edge``: the model's rendering, None for a run
    without a model (an OCR's resolution is held within the limits by ``ocr_resolution``)."""
    width, height = page["width"], page["height"]
    if min(width, height) <= 0:
        return f"page has no area ({width}x{height} pt)"
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        return f"page is {width:.0f}x{height:.0f} pt, over limits.max_aspect_ratio={limits.max_aspect_ratio}"
    if page["pixels"] is not None and page["pixels"] > limits.max_pixels_per_page:
        return f"the image has {page['pixels']} px, over limits.max_pixels_per_page={limits.max_pixels_per_page}"
    if longest_edge is None:
        return None
    rows, columns = rendered_size((width, height), longest_edge)
    if rows * columns > limits.max_pixels_per_page:
        return f"page renders to {columns}x{rows} px, over limits.max_pixels_per_page={limits.max_pixels_per_page}"
    return None


def needs_words(questions: list[QuestionTemplate], ocr: OcrConfig) -> bool:
    """Whether a page without a usable text layer is OCR'd for these questions: one is answered from text, or
    has a typed answer whose evidence is looked for (every model answer with ``ocr.evidence: all``)."""
    if ocr.engine == "none":
        return False
    return any(
        question.source != "model" or question.type in TYPED_EVIDENCE or ocr.evidence == "all" for question in questions
    )


def ocr_resolution(page: dict[str, Any], ocr: OcrConfig, limits: LimitsConfig) -> int:
    """The resolution a page is OCR'd at: ``ocr.dpi``, lowered for a PDF page so large that its pixels at that
    resolution would pass ``limits.max_pixels_per_page`` (an image keeps its own pixels, checked already)."""
    if page["pixels"] is not None:
        return ocr.dpi
    square_inches = page["width"] * page["height"] / 72**2
    return max(1, min(ocr.dpi, math.floor(math.sqrt(limits.max_pixels_per_page / square_inches))))


def estimated_bytes(page: Page) -> int:
    """An upper bound on what ``page`` takes in a table: its images; its strings (document, text, words,
    question ids, error) at 4 bytes a character (UTF-8's most); the words' and question ids' offsets and
    boxes; and 1 KiB for its other columns."""
    strings = [page.document, page.text or "", page.error or "", *page.words, *page.question_ids]
    characters = sum(map(len, strings))
    return page.sub_images.nbytes + 4 * characters + 24 * len(page.words) + 8 * len(page.question_ids) + 1024


def whole_document(unit: WorkUnit, **fields) -> Page:
    """The record of ``unit``'s document as a whole: its status (a failure) and no page."""
    identity = {name: getattr(unit, name) for name in IDENTITY}
    defaults = {"num_pages": unit.num_pages, "page_number": None, "question_ids": [], "by_model": []}
    defaults |= {"document_rows": 1, "repaired": unit.repaired, "status": unit.status, "error": unit.error}
    defaults |= {"source_format": unit.source_format}
    return Page(**identity, scope=DOCUMENT, **(defaults | fields))


class Renderer:
    """A work unit → its page records (see the module's docstring)."""

    def __init__(
        self,
        config: JobConfig,
        geometry: ImageGeometry | None,
        ledger=None,
        reread: Callable[[DocumentRef], Document] | None = None,
    ) -> None:
        self.config = config
        self.geometry = geometry  # the model's; None when no question can ask it (nothing is rendered for it)
        self.templates = {question.id: question for question in config.questions}
        self.report_isolation = report_isolation(ledger)
        self.reread = reread  # reads a unit's document again when the unit comes without its bytes
        self.tessdata: str | None = None  # found when a page first needs OCR

    def render(self, unit: WorkUnit) -> Iterator[Page]:
        """The unit's pages as they are rendered, or the one record that speaks for the whole document."""
        if unit.status != Status.OK:
            yield whole_document(unit)
            return
        data = unit.data
        if not data:
            assert self.reread is not None  # a unit without bytes comes from a run, which rereads
            document = self.reread(DocumentRef(unit.document, unit.file_size or -1, unit.etag, unit.source_version))
            if document.status != Status.OK:
                yield whole_document(unit, status=document.status, error=document.error)
                return
            if document.sha256 != unit.sha256:
                reason = "the file changed while it was being processed; the next run takes it again"
                yield whole_document(unit, status=Status.READ_ERROR.value, error=reason)
                return
            data = document.data
        try:
            opened = open_document(data, self.config.render, self.config.limits, self.report_isolation)
        except DocumentError as error:
            yield whole_document(unit, status=error.status.value, error=f"{unit.span}{error.reason}")
            return
        try:
            for page_number, question_ids in zip(unit.pages, unit.question_ids, strict=True):
                yield self._page(opened, unit, page_number, question_ids)
        except DocumentError as error:  # out of time: the document fails as a whole
            yield whole_document(unit, status=error.status.value, error=f"{unit.span}{error.reason}")
        finally:
            opened.close()

    def _page(self, document: SandboxedDocument, unit: WorkUnit, page_number: int, question_ids: list[str]) -> Page:
        """One page's record, read, or failed with its status; raises DocumentError only for a timeout (the
        document's time is up)."""
        started = time.perf_counter()
        page = Page(
            **{name: getattr(unit, name) for name in IDENTITY},
            scope=PAGE,
            num_pages=unit.num_pages,
            page_number=page_number,
            question_ids=question_ids,
            by_model=[],
            document_rows=unit.document_rows,
            repaired=unit.repaired,
            status=Status.OK.value,
            error=None,
            source_format=unit.source_format,
        )
        try:
            self._read(document, page, [self.templates[question_id] for question_id in question_ids])
        except DocumentError as error:  # the helper died or refused, as a render can: this page fails
            document.drop_ocr()
            if error.status == Status.TIMEOUT:
                raise
            return _failed(page, error.status, f"page {page_number}: {error.reason}")
        except (HelperException, OcrUnavailable) as error:  # the parser's own exception: one bad page
            document.drop_ocr()
            return _failed(page, Status.RENDER_ERROR, f"cannot read page {page_number}: {error}")
        page.render_ms = (time.perf_counter() - started) * 1000
        return page

    def _read(self, document: SandboxedDocument, page: Page, questions: list[QuestionTemplate]) -> None:
        """Fill ``page`` in: its words (the text layer's or the OCR's), who answers each question, its
        sub-images where the model answers."""
        page_number, config = page.page_number, self.config
        assert page_number is not None
        try:
            layer = document.text_layer(page_number)
        except HelperException:  # MuPDF raised on the page's text: the page may still render
            layer = NO_TEXT_LAYER
        usable = is_usable(layer.text, config.text_layer)
        text_source = TEXT_LAYER if layer.words else None
        ocr = not usable and needs_words(questions, config.ocr)
        image: np.ndarray | None = None
        if ocr:  # the OCR reads the page while it renders for the questions the model answers whatever it reads
            info = self._checked_info(document, page)
            self.tessdata = self.tessdata or tessdata_directory(config.ocr.languages)
            dpi = ocr_resolution(info, config.ocr, config.limits)
            document.start_ocr(page_number, config.ocr.language, dpi, self.tessdata)
            if any(question.source == "model" for question in questions):
                image = self._render(document, page_number)
            layer = document.finish_ocr()
            usable, text_source = is_usable(layer.text, config.text_layer), OCR
        page.by_model = [question.answered_by_model(usable) for question in questions]
        if any(page.by_model) and image is None:
            if not ocr:
                self._checked_info(document, page)
            image = self._render(document, page_number)
        page.text = layer.text if any(question.source != "model" for question in questions) else None
        page.words, page.word_boxes, page.text_layer_chars = layer.words, layer.boxes, layer.chars
        page.text_usable, page.text_source = usable, text_source
        if image is not None:
            page.sub_images, page.sub_image_shapes = pack_images(split_page(image, self.geometry))

    def _checked_info(self, document: SandboxedDocument, page: Page) -> dict[str, Any]:
        """The page's size and resolution from the helper (``page.page_dpi`` set), refused as
        ``page_too_large`` before any pixel is decoded when it is over the limits."""
        info = document.page_info(page.page_number)
        page.page_dpi = info["dpi"]
        longest_edge = self.geometry.render_longest_edge if self.geometry else None
        too_large = page_limit_violation(info, longest_edge, self.config.limits)
        if too_large:
            raise DocumentError(Status.PAGE_TOO_LARGE, too_large)
        return info

    def _render(self, document: SandboxedDocument, page_number: int) -> np.ndarray:
        assert self.geometry is not None  # a page is rendered only for a question the model may answer
        try:
            return document.render(page_number, self.geometry.render_longest_edge)
        except HelperException as error:
            raise DocumentError(Status.RENDER_ERROR, f"cannot render page {page_number}: {error}") from None


def _failed(page: Page, status: Status, reason: str) -> Page:
    page.status, page.error = status.value, reason
    return page


class RenderPages:
    """The rendering stage: a block of render batches (one, after the repartition) → their units' pages, in
    tables (``page_tables``)."""

    def __init__(self, config: JobConfig, geometry: ImageGeometry | None, ledger=None) -> None:
        self.renderer = Renderer(config, geometry, ledger, reread=ReadDocument(config.limits, config.storage))
        self.ledger = ledger
        self.start_reported = False

    def __call__(self, batches: pa.Table) -> Iterator[pa.Table]:
        if self.ledger is not None and not self.start_reported:  # the run's "time to start rendering"
            self.ledger.record_render_start.remote(time.time())
            self.start_reported = True
        units = (unit for batch in from_table(batches, RenderBatch) for unit in batch.units)
        yield from page_tables(page for unit in units for page in self.renderer.render(unit))


def page_tables(pages: Iterable[Page]) -> Iterator[pa.Table]:
    """``pages`` as tables of at most ``PAGE_ROW_ALLOWANCE`` (``estimated_bytes``) or of one page that is
    larger, each handed on once the next page would not fit; a page with images (the model's) at once."""
    pending: list[Page] = []
    pending_bytes = 0
    for page in pages:
        size = estimated_bytes(page)
        if pending and pending_bytes + size > PAGE_ROW_ALLOWANCE:
            yield to_table(pending, Page)
            pending, pending_bytes = [], 0
        pending.append(page)
        pending_bytes += size
        if page.sub_images.nbytes:
            yield to_table(pending, Page)
            pending, pending_bytes = [], 0
    if pending:
        yield to_table(pending, Page)


def document_pages(config: JobConfig, geometry: ImageGeometry, document: Document) -> list[Page]:
    """A document's pages (or the one record saying why it has none), planned and rendered in this process:
    what the online endpoint does with an upload."""
    renderer = Renderer(config, geometry)
    return [page for unit in Planner(config).plan(document) for page in renderer.render(unit)]
