"""The rendering stage: work units → their pages (``RenderPages``, one task per unit), one page handed on at
a time, so that Ray closes a block at the run's byte budget (``render.block_mb``) and a task's memory does
not grow with the document.

For each page of its unit the helper reads the page's text layer, and here, once, each question of the
page is given to the model or to the text layer (``source``: ``auto`` takes the text layer where it is
usable). Only a page some question needs the model for is rendered, at the resolution the model keeps, and
split into the sub-images the model takes (pipeline/images.py). A page that cannot be rendered becomes the
record of that page with its status; a unit that fails as a whole (its time or memory limit, its re-read)
becomes one record for the whole document (``scope`` ``document``), which the writer keeps alone however
many of the document's rows it had. Nothing raises out of the stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pyarrow as pa

from pipeline.config import JobConfig, LimitsConfig
from pipeline.images import ImageGeometry, pack_images, split_page
from pipeline.ledger import report_isolation
from pipeline.pdf import NO_TEXT_LAYER, rendered_size
from pipeline.planning import Planner, ReadDocument
from pipeline.records import (
    DOCUMENT,
    IDENTITY,
    PAGE,
    Document,
    DocumentError,
    DocumentRef,
    Page,
    Status,
    WorkUnit,
    from_table,
    to_table,
)
from pipeline.sandbox import SandboxedDocument, open_document
from pipeline.text_layer import is_usable


def page_limit_violation(page_size: tuple[float, float], longest_edge: int, limits: LimitsConfig) -> str | None:
    """Why a page must not be rendered (checked from its size, before any pixel exists), or None."""
    width, height = page_size
    if min(width, height) <= 0:
        return f"page has no area ({width}x{height} pt)"
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        return f"page is {width:.0f}x{height:.0f} pt, over limits.max_aspect_ratio={limits.max_aspect_ratio}"
    rows, columns = rendered_size(page_size, longest_edge)
    if rows * columns > limits.max_pixels_per_page:
        return f"page renders to {columns}x{rows} px, over limits.max_pixels_per_page={limits.max_pixels_per_page}"
    return None


def whole_document(unit: WorkUnit, **fields) -> Page:
    """The record of ``unit``'s document as a whole: its status (a failure) and no page."""
    identity = {name: getattr(unit, name) for name in IDENTITY}
    defaults = {"num_pages": unit.num_pages, "page_number": None, "question_ids": [], "by_model": []}
    defaults |= {"document_rows": 1, "repaired": unit.repaired, "status": unit.status, "error": unit.error}
    return Page(**identity, scope=DOCUMENT, **(defaults | fields))


class Renderer:
    """A work unit → its page records (see the module's docstring)."""

    def __init__(
        self,
        config: JobConfig,
        geometry: ImageGeometry,
        ledger=None,
        reread: Callable[[DocumentRef], Document] | None = None,
    ) -> None:
        self.config = config
        self.geometry = geometry
        self.templates = {question.id: question for question in config.questions}
        self.report_isolation = report_isolation(ledger)
        self.reread = reread  # reads a unit's document again when the unit comes without its bytes

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
            yield from self._pages(opened, unit)
        except DocumentError as error:  # out of time: the document fails as a whole
            yield whole_document(unit, status=error.status.value, error=f"{unit.span}{error.reason}")
        finally:
            opened.close()

    def _pages(self, document: SandboxedDocument, unit: WorkUnit) -> Iterator[Page]:
        longest_edge = self.geometry.render_longest_edge
        identity = {name: getattr(unit, name) for name in IDENTITY}
        for page_number, question_ids in zip(unit.pages, unit.question_ids, strict=True):
            started = time.perf_counter()
            questions = [self.templates[question_id] for question_id in question_ids]
            page = Page(
                **identity,
                scope=PAGE,
                num_pages=unit.num_pages,
                page_number=page_number,
                question_ids=question_ids,
                by_model=[],
                document_rows=unit.document_rows,
                repaired=unit.repaired,
                status=Status.OK.value,
                error=None,
            )
            try:
                layer = document.text_layer(page_number)
            except DocumentError as error:  # the helper died on the page, as a render can: this page fails
                if error.status == Status.TIMEOUT:
                    raise
                yield _failed(page, error.status, f"page {page_number}: {error.reason}")
                continue
            except Exception:  # noqa: BLE001 - MuPDF raised on the page's text: the page may still render
                layer = NO_TEXT_LAYER
            usable = is_usable(layer.text, self.config.text_layer)
            page.by_model = [question.answered_by_model(usable) for question in questions]
            page.text = layer.text if any(question.source != "model" for question in questions) else None
            page.words, page.word_boxes, page.text_layer_chars = layer.words, layer.boxes, layer.chars
            page.text_usable = usable
            if page.by_model and any(page.by_model):
                try:
                    too_large = page_limit_violation(document.page_size(page_number), longest_edge, self.config.limits)
                    if too_large:
                        yield _failed(page, Status.PAGE_TOO_LARGE, too_large)
                        continue
                    image = document.render(page_number, longest_edge)
                except DocumentError as error:
                    if error.status == Status.TIMEOUT:
                        raise
                    yield _failed(page, error.status, f"page {page_number}: {error.reason}")
                    continue
                except Exception as error:  # noqa: BLE001 - one bad page must not fail its document
                    reason = f"cannot render page {page_number}: {type(error).__name__}: {error}"
                    yield _failed(page, Status.RENDER_ERROR, reason)
                    continue
                page.sub_images, page.sub_image_shapes = pack_images(split_page(image, self.geometry))
            page.render_ms = (time.perf_counter() - started) * 1000
            yield page


def _failed(page: Page, status: Status, reason: str) -> Page:
    page.status, page.error = status.value, reason
    return page


class RenderPages:
    """The rendering stage: a block of work units → their pages, one page per table handed on."""

    def __init__(self, config: JobConfig, geometry: ImageGeometry, ledger=None) -> None:
        self.renderer = Renderer(config, geometry, ledger, reread=ReadDocument(config.limits, config.storage))
        self.ledger = ledger
        self.start_reported = False

    def __call__(self, units: pa.Table) -> Iterator[pa.Table]:
        if self.ledger is not None and not self.start_reported:  # the run's "time to start rendering"
            self.ledger.record_render_start.remote(time.time())
            self.start_reported = True
        for unit in from_table(units, WorkUnit):
            for page in self.renderer.render(unit):
                yield to_table([page], Page)


def document_pages(config: JobConfig, geometry: ImageGeometry, document: Document) -> list[Page]:
    """A document's pages (or the one record saying why it has none), planned and rendered in this process:
    what the online endpoint does with an upload."""
    renderer = Renderer(config, geometry)
    return [page for unit in Planner(config).plan(document) for page in renderer.render(unit)]
