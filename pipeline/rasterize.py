"""Open each read document in the render helper, plan its work units, and render the pages of each unit
at the resolution the model keeps (pipeline/document_pages.py runs the two halves as two Ray stages).

``plan``: a read document → its work units, page ranges of at most ``render.range_pages`` of the pages
some question applies to (decided here once), each rendered by its own task so that a long document uses
every core; or the one unit that says why the document has no pages (corrupt, encrypted, too many pages,
...); or none, for a document over the run's page budget (the ledger counts it; the next run picks it up).

``render``: a unit → its page rows, one at a time as they are rendered, so that memory does not grow with
the document. A page that cannot be rendered becomes a row for that page (the actor expands it to one per
question). A unit that fails as a whole (its time or memory limit, its re-read) becomes one row for the
whole document; the writer keeps that row alone, however many of the document's rows it had (a document
fails once and completely). Nothing raises out of either half.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from pipeline.config import JobConfig
from pipeline.images import ImageGeometry
from pipeline.pdf import NO_TEXT_LAYER, page_limit_violation
from pipeline.rows import DocumentError, Status, failed, page_row
from pipeline.sandbox import RenderSandbox, SandboxedDocument
from pipeline.text_layer import is_usable


class RasterizeDocument:
    """A read document → its work units (``plan``) → their page rows (``render``); called on a document, both
    in turn (the online endpoint)."""

    def __init__(
        self,
        config: JobConfig,
        geometry: ImageGeometry,
        ledger=None,
        reread: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.config = config
        self.geometry = geometry
        self.ledger = ledger  # the run's ledger: its page budget, and how the render helpers are isolated
        self.reread = reread  # reads a unit's document again when the unit comes without its bytes
        self.isolation_reported: set[int] = set()  # helper processes whose isolation the ledger has

    def __call__(self, document: dict[str, Any]) -> list[dict[str, Any]]:
        return [page for unit in self.plan(document) for page in self.render(unit)]

    def _open(self, data: bytes) -> SandboxedDocument:
        """The document opened in this process's helper, under the limits of one unit (raises DocumentError)."""
        limits, render = self.config.limits, self.config.render
        try:
            opened = SandboxedDocument(
                data,
                render.backend,
                tuple(password.get_secret_value() for password in render.passwords),
                limits.render_memory_mb,
                limits.document_timeout_s,
            )
        except DocumentError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever a hostile file makes the parser raise
            raise DocumentError(Status.CORRUPT, f"cannot open it: {type(error).__name__}: {error}") from None
        self._report_isolation(opened.sandbox)
        return opened

    def _report_isolation(self, sandbox: RenderSandbox) -> None:
        """Tell the run's ledger how a new helper process was isolated (once per helper)."""
        if self.ledger is not None and sandbox.process_id not in self.isolation_reported:
            self.isolation_reported.add(sandbox.process_id)
            self.ledger.record_isolation.remote(sandbox.isolation["network"])

    def plan(self, document: dict[str, Any]) -> list[dict[str, Any]]:
        """The document's work units: its fields, ``data`` (its bytes), ``num_pages``, ``repaired``, the
        unit's ``first_page``..``last_page`` and ``document_rows``; or one failed unit; or none (deferred)."""
        unit = {**document, "num_pages": None, "repaired": False, "first_page": None, "last_page": None, "ranges": 1}
        if document["status"] != Status.OK:
            return [unit]
        try:
            opened = self._open(document["data"])
        except DocumentError as error:
            return [failed(unit, error.status, error.reason)]
        opened.close()
        num_pages = opened.num_pages
        unit.update(num_pages=num_pages, repaired=opened.repaired)
        limits = self.config.limits
        if num_pages > limits.max_pages_per_document:
            reason = f"{num_pages} pages, over limits.max_pages_per_document={limits.max_pages_per_document}"
            return [failed(unit, Status.TOO_MANY_PAGES, reason)]
        questions = [len(self.config.questions_for_page(page, num_pages)) for page in range(1, num_pages + 1)]
        pages = [page for page, count in enumerate(questions, start=1) if count]
        if not pages:
            reason = f"no question applies to any of its {num_pages} page(s)"
            return [failed(unit, Status.NO_APPLICABLE_PAGES, reason)]
        if self.ledger is not None and self.config.budget.max_pages is not None:
            import ray

            if not ray.get(self.ledger.take_pages.remote(len(pages))):
                return []  # over this run's page budget: counted by the ledger, left for the next run
        # Every (page, question) gets exactly one row, answered or not: the writer uses this to know a
        # document is complete.
        unit["document_rows"] = sum(questions)
        size = self.config.render.range_pages
        starts = range(0, len(pages), size)
        return [
            {
                **unit,
                "first_page": pages[start],
                "last_page": pages[min(start + size, len(pages)) - 1],
                "ranges": len(starts),
            }
            for start in starts
        ]

    def render(self, unit: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The unit's page rows as they are rendered, or the one row that speaks for the whole document."""
        whole = page_row(unit, num_pages=unit["num_pages"], repaired=unit["repaired"])
        if unit["status"] != Status.OK:
            yield whole
            return
        if not unit["data"]:
            document = self.reread(unit)
            if document["status"] != Status.OK:
                yield failed(whole, Status(document["status"]), document["error"])
                return
            if document["sha256"] != unit["sha256"]:
                reason = "the file changed while it was being processed; the next run takes it again"
                yield failed(whole, Status.READ_ERROR, reason)
                return
            unit = {**unit, "data": document["data"]}
        # Which part of the document a failure is in, when it has several.
        pages = f"pages {unit['first_page']}-{unit['last_page']}: " if unit["ranges"] > 1 else ""
        try:
            opened = self._open(unit["data"])
        except DocumentError as error:
            yield failed(whole, error.status, f"{pages}{error.reason}")
            return
        try:
            yield from self._render_pages(opened, unit, whole)
        except DocumentError as error:  # out of time: the document fails as a whole
            yield failed(whole, error.status, f"{pages}{error.reason}")
        finally:
            opened.close()

    def _render_pages(
        self, document: SandboxedDocument, unit: dict[str, Any], whole: dict[str, Any]
    ) -> Iterator[dict[str, Any]]:
        limits, num_pages = self.config.limits, unit["num_pages"]
        longest_edge = self.geometry.render_longest_edge
        for page_number in range(unit["first_page"], unit["last_page"] + 1):
            questions = self.config.questions_for_page(page_number, num_pages)
            if not questions:
                continue
            started = time.perf_counter()
            page = {
                **whole,
                "page_number": page_number,
                "question_ids": [question.id for question in questions],
                "document_rows": unit["document_rows"],
            }
            try:
                layer = document.text_layer(page_number)
            except DocumentError as error:  # the helper died on the page, as a render can: this page fails
                if error.status == Status.TIMEOUT:
                    raise
                yield failed(page, error.status, f"page {page_number}: {error.reason}")
                continue
            except Exception:  # noqa: BLE001 - MuPDF raised on the page's text: the page may still render
                layer = NO_TEXT_LAYER
            usable = is_usable(layer.text, self.config.text_layer)
            page.update(
                text=layer.text if any(question.source != "model" for question in questions) else None,
                words=layer.words,
                word_boxes=layer.boxes,
                text_layer_chars=layer.chars,
                text_usable=usable,
            )
            if not any(question.answered_by_model(usable) for question in questions):
                yield {**page, "render_ms": (time.perf_counter() - started) * 1000}  # no pixels needed
                continue
            try:
                too_large = page_limit_violation(document.page_size(page_number), longest_edge, limits)
                if too_large:
                    yield failed(page, Status.PAGE_TOO_LARGE, too_large)
                    continue
                image = document.render(page_number, longest_edge)
            except DocumentError as error:
                if error.status == Status.TIMEOUT:
                    raise
                yield failed(page, error.status, f"page {page_number}: {error.reason}")
                continue
            except Exception as error:  # noqa: BLE001 - one bad page must not fail its document
                yield failed(
                    page, Status.RENDER_ERROR, f"cannot render page {page_number}: {type(error).__name__}: {error}"
                )
                continue
            yield {**page, "render_ms": (time.perf_counter() - started) * 1000, "image": image}
