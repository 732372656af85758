"""The run's ledger: the counts and claims a run's tasks share, kept by one small Ray actor on the driver's
node: the budgets (documents and pages left), what the listing took, skipped or left for the next run, the
link targets already listed, when rendering began, and how the render helpers were isolated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class RunLedger:
    """Documents and pages left in this run's budget, what the listing skipped or left for the next run, the
    link targets already listed, when rendering began, and the isolation of the render helpers."""

    def __init__(self, max_pages: int | None, max_documents: int | None = None) -> None:
        self.max_pages = max_pages
        self.max_documents = max_documents
        self.documents_taken: dict[str, int] = {}  # URI -> the listing task that took it
        self.pages_taken = 0
        self.documents_deferred = 0
        self.listing_counts: dict[int, dict[str, int]] = {}  # per listing task
        self.listing_tasks_done: set[int] = set()
        self.listing_tasks: int | None = None
        self.outside_claims: dict[str, int] = {}  # path -> the listing task that lists it
        self.first_render_at: float | None = None  # wall-clock time the first unit's rendering began
        self.render_isolation: set[str] = set()

    def take_document(self, task: int, uri: str) -> bool:
        """Reserve one of ``max_documents`` for listing task ``task``; False once they are all taken. The
        same answer again for a task that Ray runs again (a retry, or lost output rebuilt)."""
        if uri in self.documents_taken:
            return self.documents_taken[uri] == task
        if self.max_documents is not None and len(self.documents_taken) >= self.max_documents:
            return False
        self.documents_taken[uri] = task
        return True

    def take_pages(self, pages: int) -> bool:
        """Reserve a whole document's pages; False once the budget cannot hold them (the document waits)."""
        if self.max_pages is not None and self.pages_taken + pages > self.max_pages:
            self.documents_deferred += 1
            return False
        self.pages_taken += pages
        return True

    def record_listing(self, task: int, tasks: int, counts: dict[str, int], complete: bool) -> None:
        """A listing task's counts so far (task ``task`` of ``tasks``): documents taken by this run, resumed
        (committed by an earlier attempt of it), unchanged since a committed run, and left for the next run
        by the budget."""
        self.listing_counts[task] = dict(counts)
        self.listing_tasks = tasks
        if complete:
            self.listing_tasks_done.add(task)

    def listing_progress(self) -> tuple[dict[str, int], bool]:
        """The whole listing's counts so far, and whether every listing task is done."""
        totals = {"taken": 0, "resumed": 0, "unchanged": 0, "left": 0}
        for counts in self.listing_counts.values():
            for name, count in counts.items():
                totals[name] += count
        return totals, self.listing_tasks is not None and len(self.listing_tasks_done) == self.listing_tasks

    def claim_outside(self, path: str, task: int) -> bool:
        """True for the listing task that first reaches ``path`` (outside the input, through a link), and for
        that task again when Ray runs it again; False for any other."""
        return self.outside_claims.setdefault(path, task) == task

    def record_render_start(self, at: float) -> None:
        """A render task began rendering a unit at ``at`` (``time.time()``); the earliest is kept."""
        self.first_render_at = at if self.first_render_at is None else min(self.first_render_at, at)

    def record_isolation(self, summary: str) -> None:
        """How a render helper was confined (its namespaces, network and seccomp filter, or why not), as it
        reported on starting."""
        self.render_isolation.add(summary)

    def report(self) -> dict[str, Any]:
        listing, _ = self.listing_progress()
        return {
            "listed_documents": listing["taken"],
            "resumed_documents": listing["resumed"],
            "unchanged_documents": listing["unchanged"],
            "left_documents": listing["left"],
            "deferred_documents": self.documents_deferred,
            "pages_taken": self.pages_taken,
            "render_isolation": sorted(self.render_isolation),
            "first_render_at": self.first_render_at,
        }


def start_ledger(max_pages: int | None, max_documents: int | None = None):
    """The ledger as a Ray actor (no CPU reserved: it only counts), pinned to the driver's node: a ledger on
    a worker node would die with that node and take the run's counts with it (measured: bench/node_loss.py),
    while the driver's node going down ends the run anyway."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(RunLedger).options(scheduling_strategy=driver_node).remote(max_pages, max_documents)


def report_isolation(ledger) -> Callable[[Any], None]:
    """A callback for ``open_document``: tells the run's ledger how each new render helper was isolated (once
    per helper process). Without a ledger (the online endpoint, tests) it does nothing."""
    reported: set[int] = set()

    def report(sandbox) -> None:
        if ledger is not None and sandbox.process_id not in reported:
            reported.add(sandbox.process_id)
            ledger.record_isolation.remote(sandbox.summary)

    return report
