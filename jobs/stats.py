"""A run's statistics as its answer rows arrive (``RunStats``: the progress line's counts and the run record's)
and its summary (``RunSummary``: what `docqa run` prints at the end, and its exit code)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.records import PAGE, RETRYABLE, Status

EXIT_DEGRADED = 3  # committed, but too many pages failed with a retryable status


@dataclass
class RunStats:
    """Counts kept as result batches arrive: drives the progress line and the final summary. ``add`` takes
    rows of complete documents (each (page, question) once, as the writer commits them), so the counts are
    exact and their memory is one entry per document, never per page or row."""

    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)  # the same instant, comparable across processes
    first_row_s: float | None = None  # seconds from the start to the first result batch
    document_status: dict[str, str] = field(default_factory=dict)  # worst status seen per document
    page_status: Counter[str] = field(default_factory=Counter)
    answers: int = 0
    rows: int = 0
    unit_status: Counter[str] = field(default_factory=Counter)  # per page, or per document without pages
    pages_arrived: int = 0  # pages in result batches so far, complete documents or not: the progress line's

    def arrived(self, table: pa.Table) -> None:
        """A result batch as it arrives (its documents may not be complete yet)."""
        pages = table.filter(pc.equal(table.column("scope"), PAGE))
        self.pages_arrived += len(pages.group_by(["document", "page_number"]).aggregate([]))

    def add(self, table: pa.Table) -> None:
        """Rows of complete documents."""
        self.rows += table.num_rows
        self.answers += (
            pc.sum(
                pc.and_(pc.equal(table.column("status"), Status.OK.value), pc.is_valid(table.column("question_id")))
            ).as_py()
            or 0
        )
        units = table.group_by(["document", "page_number"], use_threads=False).aggregate(
            [("status", "first"), ("scope", "first")]
        )
        for scope, status in zip(
            units.column("scope_first").to_pylist(), units.column("status_first").to_pylist(), strict=True
        ):
            self.unit_status[status] += 1
            if scope == PAGE:
                self.page_status[status] += 1
        failed = table.filter(pc.not_equal(table.column("status"), Status.OK.value))
        for document in pc.unique(table.column("document")).to_pylist():
            self.document_status.setdefault(document, Status.OK.value)
        for document, status in zip(
            failed.column("document").to_pylist(), failed.column("status").to_pylist(), strict=True
        ):
            if self.document_status[document] == Status.OK:
                self.document_status[document] = status

    @property
    def pages(self) -> int:
        return sum(self.page_status.values())

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def degraded(self, limit: float) -> dict[str, Any] | None:
        """The retryable failures' share of the pages that were not bad input (a document that could not be
        read counts as one page), when it is over ``limit``; None for a healthy run."""
        retryable = sum(n for status, n in self.unit_status.items() if status in RETRYABLE)
        considered = retryable + self.unit_status.get(Status.OK.value, 0)
        if not considered or retryable / considered <= limit:
            return None
        return {
            "retryable_pages": retryable,
            "pages": considered,
            "share": round(retryable / considered, 4),
            "limit": limit,
        }

    def counts(self) -> dict[str, Any]:
        return {
            "documents": dict(sorted(Counter(self.document_status.values()).items())),
            "pages": dict(sorted(self.page_status.items())),
            "answers": self.answers,
            "rows": self.rows,
        }


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    output: str
    counts: dict[str, Any]
    wall_s: float
    first_row_s: float | None
    ledger: dict[str, int]
    stage_stats: str = ""  # Ray Data's per-operator statistics of the run
    degraded: dict[str, Any] | None = None  # see RunStats.degraded
    first_render_s: float | None = None  # seconds from the start until a render task took its first unit

    @property
    def exit_code(self) -> int:
        return EXIT_DEGRADED if self.degraded else 0

    def text(self) -> str:
        documents = self.counts["documents"]
        ok = documents.get(Status.OK.value, 0)
        failed = {status: n for status, n in documents.items() if status != Status.OK}
        failed_text = ", ".join(f"{n} {status}" for status, n in failed.items()) or "none"
        pages = sum(self.counts["pages"].values())
        health = ""
        if self.degraded:
            health = (
                f" DEGRADED: {self.degraded['retryable_pages']} of {self.degraded['pages']} pages failed with a "
                f"retryable status (model_error, read_error), over limits.max_failed_page_share="
                f"{self.degraded['limit']:g}; the next run takes them again"
            )
        resumed = self.ledger.get("resumed_documents", 0)
        resumed = f"  of which committed by an earlier attempt of this run: {resumed} documents\n" if resumed else ""
        return (
            f"run {self.run_id} committed{health}\n"
            f"  documents: {ok + sum(failed.values())} ({ok} ok; failed: {failed_text})\n"
            f"  pages: {pages} ({self.counts['pages'].get(Status.OK.value, 0)} ok) · answers: {self.counts['answers']}"
            f" · rows: {self.counts['rows']}\n"
            f"{resumed}"
            f"  skipped (unchanged since a committed run): {self.ledger['unchanged_documents']} · left for the next"
            f" run: {self.ledger['left_documents'] + self.ledger['deferred_documents']}\n"
            f"  wall time: {self.wall_s:.1f}s (this attempt, start to commit; `docqa runs` duration_s)"
            f" · {pages / max(self.wall_s, 1e-9):.2f} pages/s\n"
            f"  output: {self.output} (tables answers, current, items, runs)"
        )
