"""A run's progress on a timer, whether or not a batch has finished: documents done of listed (the listing
count as it grows), pages and answers per second, and an ETA once the listing is complete. On a terminal it
is a tqdm bar on stderr; otherwise (a log file, a Ray Job's log) it is a log line every interval."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("docqa")
LISTING_POLL_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class ProgressSnapshot:
    """What the progress line shows, taken at one moment."""

    documents_done: int  # complete documents of this run, those resumed from an earlier attempt included
    documents_listed: int  # taken by this run so far (resumed included); grows with the listing
    listing_complete: bool
    pages: int
    answers: int
    elapsed_s: float
    documents_done_at_start: int  # resumed documents: not counted in the rate

    def line(self) -> str:
        listed = f"{self.documents_listed}{'' if self.listing_complete else '+'}"
        elapsed = max(self.elapsed_s, 1e-9)
        parts = [
            f"documents {self.documents_done}/{listed}",
            f"pages {self.pages}",
            f"answers {self.answers}",
            f"{self.pages / elapsed:.2f} pages/s",
            f"{self.answers / elapsed:.1f} answers/s",
        ]
        eta = self.eta_s()
        if eta is not None:
            parts.append(f"ETA {eta:.0f}s")
        parts.append(f"{self.elapsed_s:.0f}s")
        return " · ".join(parts)

    def eta_s(self) -> float | None:
        """Seconds left at this run's document rate; None until the listing is complete and a document done."""
        done_here = self.documents_done - self.documents_done_at_start
        if not self.listing_complete or done_here <= 0:
            return None
        return (self.documents_listed - self.documents_done) * self.elapsed_s / done_here


class ProgressReporter:
    """Shows ``snapshot()`` every ``interval_s`` from a thread, until the ``with`` block ends (with a last
    report). ``listing`` asks the run's ledger for the listing's counts; it may be slow or fail, and the
    line then keeps the last counts it had."""

    def __init__(
        self,
        snapshot: Callable[[dict[str, int], bool], ProgressSnapshot],
        listing: Callable[[float], tuple[dict[str, int], bool]],
        interval_s: float,
        terminal: bool | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.listing = listing
        self.interval_s = interval_s
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self._counts: dict[str, int] = {}
        self._complete = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="docqa-progress", daemon=True)
        self._bar: Any = None

    def __enter__(self) -> ProgressReporter:
        if self.terminal:
            from tqdm import tqdm

            self._bar = tqdm(total=0, unit="doc", desc="documents", file=sys.stderr, dynamic_ncols=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped.set()
        self._thread.join()
        self.report()
        if self._bar is not None:
            self._bar.close()

    def _loop(self) -> None:
        while not self._stopped.wait(self.interval_s):
            self.report()

    def report(self) -> ProgressSnapshot:
        try:
            self._counts, self._complete = self.listing(LISTING_POLL_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - progress must never end a run; the last counts stay
            log.debug("listing counts unavailable: %s", error)
        snapshot = self.snapshot(self._counts, self._complete)
        if self._bar is None:
            log.info("%s", snapshot.line())
        else:
            self._bar.total = snapshot.documents_listed
            self._bar.n = snapshot.documents_done
            self._bar.set_postfix_str(snapshot.line().split(" · ", 1)[1], refresh=True)
        return snapshot
