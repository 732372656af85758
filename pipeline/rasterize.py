"""Open each read document in the render helper and render the pages some question applies to, at the
resolution the model keeps; part of the per-document ``map_batches`` task (pipeline/document_pages.py).

A document that cannot be processed becomes one row with its status and reason; a page that cannot be
rendered becomes a row for that page (the actor expands it to one per question). Each page row carries
the ids of the questions that apply to it, decided here once. A document over the run's page budget is
dropped here (the ledger counts it; the next run picks it up). Nothing raises out of this stage.
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.config import JobConfig
from pipeline.images import ImageGeometry
from pipeline.pdf import page_limit_violation
from pipeline.rows import DocumentError, Status, failed, page_row
from pipeline.sandbox import RenderSandbox, SandboxedDocument


class RasterizeDocument:
    """A read document → one row per rendered page, or one row saying why not (or none: deferred)."""

    def __init__(self, config: JobConfig, geometry: ImageGeometry, ledger=None) -> None:
        self.config = config
        self.geometry = geometry
        self.ledger = ledger  # the run's ledger: its page budget, and how the render helpers are isolated
        self.isolation_reported: set[int] = set()  # helper processes whose isolation the ledger has

    def __call__(self, document: dict[str, Any]) -> list[dict[str, Any]]:
        whole = page_row(document)
        if document["status"] != Status.OK:
            return [whole]
        limits, render = self.config.limits, self.config.render
        try:
            opened = SandboxedDocument(
                document["data"],
                render.backend,
                tuple(password.get_secret_value() for password in render.passwords),
                limits.render_memory_mb,
                limits.document_timeout_s,
            )
        except DocumentError as error:
            return [failed(whole, error.status, error.reason)]
        except Exception as error:  # noqa: BLE001 - whatever a hostile file makes the parser raise
            return [failed(whole, Status.CORRUPT, f"cannot open it: {type(error).__name__}: {error}")]
        self._report_isolation(opened.sandbox)
        try:
            return self._render_pages(opened, {**whole, "repaired": opened.repaired, "num_pages": opened.num_pages})
        except DocumentError as error:  # out of time: the document fails as a whole, partial pages dropped
            return [failed(whole, error.status, error.reason)]
        finally:
            opened.close()

    def _report_isolation(self, sandbox: RenderSandbox) -> None:
        """Tell the run's ledger how a new helper process was isolated (once per helper)."""
        if self.ledger is not None and sandbox.process_id not in self.isolation_reported:
            self.isolation_reported.add(sandbox.process_id)
            self.ledger.record_isolation.remote(sandbox.isolation["network"])

    def _render_pages(self, document: SandboxedDocument, whole: dict[str, Any]) -> list[dict[str, Any]]:
        num_pages = document.num_pages
        limits = self.config.limits
        if num_pages > limits.max_pages_per_document:
            reason = f"{num_pages} pages, over limits.max_pages_per_document={limits.max_pages_per_document}"
            return [failed(whole, Status.TOO_MANY_PAGES, reason)]
        questions = {
            page: [question.id for question in self.config.questions_for_page(page, num_pages)]
            for page in range(1, num_pages + 1)
        }
        pages = [page for page, ids in questions.items() if ids]
        if not pages:
            reason = f"no question applies to any of its {num_pages} page(s)"
            return [failed(whole, Status.NO_APPLICABLE_PAGES, reason)]
        if self.ledger is not None and self.config.budget.max_pages is not None:
            import ray

            if not ray.get(self.ledger.take_pages.remote(len(pages))):
                return []  # over this run's page budget: counted by the ledger, left for the next run
        # Every (page, question) gets exactly one row, answered or not: the writer uses this to know a
        # document is complete.
        document_rows = sum(len(questions[page]) for page in pages)
        longest_edge = self.geometry.render_longest_edge
        rows = []
        for page_number in pages:
            page = {**whole, "page_number": page_number, "question_ids": questions[page_number]}
            page["document_rows"] = document_rows
            started = time.perf_counter()
            try:
                too_large = page_limit_violation(document.page_size(page_number), longest_edge, limits)
                if too_large:
                    rows.append(failed(page, Status.PAGE_TOO_LARGE, too_large))
                    continue
                image = document.render(page_number, longest_edge)
            except DocumentError as error:
                if error.status == Status.TIMEOUT:
                    raise
                rows.append(failed(page, error.status, f"page {page_number}: {error.reason}"))
                continue
            except Exception as error:  # noqa: BLE001 - one bad page must not fail its document
                reason = f"cannot render page {page_number}: {type(error).__name__}: {error}"
                rows.append(failed(page, Status.RENDER_ERROR, reason))
                continue
            rows.append({**page, "render_ms": (time.perf_counter() - started) * 1000, "image": image})
        return rows
