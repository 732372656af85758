"""Per-run budgets, listing counts and render isolation, shared by the stages through one small Ray actor."""

from __future__ import annotations

from typing import Any


class RunLedger:
    """Pages left in this run's budget, what the listing skipped or left for the next run, and the isolation
    of the render helpers."""

    def __init__(self, max_pages: int | None) -> None:
        self.max_pages = max_pages
        self.pages_taken = 0
        self.documents_deferred = 0
        self.listing: dict[str, int] = {"taken": 0, "resumed": 0, "unchanged": 0, "left": 0}
        self.listing_complete = False
        self.render_isolation: set[str] = set()

    def take_pages(self, pages: int) -> bool:
        """Reserve a whole document's pages; False once the budget cannot hold them (the document waits)."""
        if self.max_pages is not None and self.pages_taken + pages > self.max_pages:
            self.documents_deferred += 1
            return False
        self.pages_taken += pages
        return True

    def record_listing(self, counts: dict[str, int], complete: bool) -> None:
        """The listing's counts so far: documents taken by this run, resumed (committed by an earlier attempt
        of it), unchanged since a committed run, and left for the next run by the budget."""
        self.listing = dict(counts)
        self.listing_complete = complete

    def listing_progress(self) -> tuple[dict[str, int], bool]:
        return self.listing, self.listing_complete

    def record_isolation(self, network: str) -> None:
        """How a render helper's network was closed (or why not), as it reported on starting."""
        self.render_isolation.add(network)

    def report(self) -> dict[str, Any]:
        return {
            "listed_documents": self.listing["taken"],
            "resumed_documents": self.listing["resumed"],
            "unchanged_documents": self.listing["unchanged"],
            "left_documents": self.listing["left"],
            "deferred_documents": self.documents_deferred,
            "pages_taken": self.pages_taken,
            "render_isolation": sorted(self.render_isolation),
        }


def start_ledger(max_pages: int | None):
    """The ledger as a Ray actor (no CPU reserved: it only counts), pinned to the driver's node: a ledger on
    a worker node would die with that node and take the run's counts with it (measured: bench/node_loss.py),
    while the driver's node going down ends the run anyway."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(RunLedger).options(scheduling_strategy=driver_node).remote(max_pages)
