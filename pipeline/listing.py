"""The listing stage: the input's documents as ``DocumentRef`` records, found as the listing goes.

``DocumentListing`` is the Ray Data source (``read_datasource``): the input cut into shards (a folder's
subfolders, a prefix's subprefixes: pipeline/locations.py), one read task each, a few at a time, each yielding
the documents it takes; those whose (URI, version) has committed results already are skipped
(pipeline/skipping.py: decided in the task, a batch of listed documents at a time), and a run's
``max_documents`` is counted by the run's ledger. Reading bytes is the planning stage's.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.config import StorageConfig
from pipeline.locations import ListingShard, first_time, iter_shard, listing_shards, never
from pipeline.record_schema import to_table
from pipeline.records import REF_SCHEMA, DocumentRef
from pipeline.skipping import SKIP_BATCH_DOCUMENTS, KnownVersions, SkipDecision

# Listing tasks that run at once: a shard's task waits on directory or object-store pages, and holds no CPU
# (jobs/run.py), so a few of them overlap those waits without taking much from the render tasks.
LISTING_TASKS_AT_ONCE = 4
# More shards than this are walked a few to a task (a bucket of 100,000 prefixes is not 100,000 Ray tasks).
MAX_LISTING_TASKS = 2000


@dataclass(frozen=True)
class ListingTask:
    """What one listing task needs: its shards and the run's settings; the versions an earlier attempt of
    the run committed travel through the object store once (``resumed``), not in every task."""

    number: int
    tasks: int
    shards: list[ListingShard]
    storage: StorageConfig
    skip: SkipDecision | None  # None: nothing is skipped (no output yet, or a run without one)
    resumed: Any  # ObjectRef of KnownVersions
    max_documents: int | None
    ledger: Any
    follow_links: bool = False

    def __call__(self) -> Iterator[pa.Table]:
        import ray

        resumed = ray.get(self.resumed)
        counts = {"taken": 0, "resumed": 0, "unchanged": 0, "left": 0}
        claim, take = self._claim(), self._take()
        reported = time.monotonic()
        listed = (ref for shard in self.shards for ref in iter_shard(shard, self.storage, claim))
        # Ray Data hands a read task's small rows on when the task ends, so deciding a batch at a time delays
        # none of them.
        while batch := list(itertools.islice(listed, SKIP_BATCH_DOCUMENTS)):
            versioned = [ref.document for ref in batch if ref.source_version is not None]
            completed = self.skip.completed(versioned) if self.skip is not None else KnownVersions()
            taken: list[DocumentRef] = []
            for ref in batch:
                known = ref.source_version is not None
                if known and (ref.document, ref.source_version) in resumed:
                    counts["resumed"] += 1
                elif known and (ref.document, ref.source_version) in completed:
                    counts["unchanged"] += 1
                elif not take(ref.document):
                    counts["left"] += 1
                else:
                    counts["taken"] += 1
                    taken.append(ref)
            if taken:  # one table a batch: a table a document cost more than the listing itself
                yield to_table(taken, DocumentRef)
            if self.ledger is not None and time.monotonic() - reported >= 1.0:
                self.ledger.record_listing.remote(self.number, self.tasks, counts, complete=False)
                reported = time.monotonic()
        if self.ledger is not None:
            ray.get(self.ledger.record_listing.remote(self.number, self.tasks, counts, complete=True))

    def _take(self) -> Callable[[str], bool]:
        """Whether the run's ``max_documents`` has room for a document: the ledger counts for every listing
        task of the run (once it says no, this task stops asking)."""
        if self.max_documents is None:
            return lambda uri: True
        if self.ledger is None:
            taken = iter(range(self.max_documents))
            return lambda uri: next(taken, None) is not None
        import ray

        room = [True]

        def take(uri: str) -> bool:
            room[0] = room[0] and ray.get(self.ledger.take_document.remote(self.number, uri))
            return room[0]

        return take

    def _claim(self) -> Callable[[Path], bool]:
        """A link target (and each folder below it) outside the input is listed by the first task to reach
        it: the run's ledger keeps the claims. Without a ledger, there is one task. With ``follow_links``
        off, none is listed."""
        if not self.follow_links:
            return never
        seen = first_time()
        if self.ledger is None:
            return seen
        import ray

        return lambda path: seen(path) and ray.get(self.ledger.claim_outside.remote(str(path), self.number))


class DocumentListing(Datasource):
    """The input listing as a Ray Data source, cut into shards (``listing_shards``: a folder's subfolders,
    a prefix's subprefixes), one read task each, a few at a time, each yielding the documents it takes. Ray
    Data packs what a read task yields into blocks of ``target_max_block_size`` and hands a block on once
    it is full or the task ends: a listing's references, ~100 bytes each, fill none, so one task for the
    whole listing held every document back until the last file was listed (bench/incremental.py). The
    driver never holds the listing.

    Documents whose (URI, version) already has committed results are skipped (``skip``: a committed run's,
    decided by each task for its own documents; ``resumed``: an earlier attempt of this run's, which count
    as done by this run); past ``max_documents`` (counted by the ledger) the rest are only counted: then the
    tasks run one at a time, in listing order, so the documents taken are the first ones listed. The counts
    go to the run's ledger as the listing grows (at most once a second per task) and once more when a task is
    done: the driver's progress line shows them. Without a ledger the listing is one task."""

    def __init__(
        self,
        input_uri: str,
        storage: StorageConfig,
        skip: SkipDecision | None = None,
        max_documents: int | None = None,
        ledger=None,
        resumed: KnownVersions | None = None,
        follow_links: bool = False,
    ) -> None:
        super().__init__()
        self.follow_links = follow_links
        self.input_uri = input_uri
        self.storage = storage
        self.skip = skip
        self.resumed = resumed or KnownVersions()
        self.max_documents = max_documents
        self.ledger = ledger

    @property
    def tasks_at_once(self) -> int:
        """How many listing tasks run at once (no more than there are: Ray Data warns of a limit it cannot use)."""
        return 1 if self.max_documents is not None else min(LISTING_TASKS_AT_ONCE, len(self._tasks))

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    @functools.cached_property
    def _tasks(self) -> list[ListingTask]:
        """Made once: Ray Data asks for the read tasks several times while planning."""
        import ray

        if self.ledger is None:
            shards = [ListingShard(self.input_uri, whole=True)]
        else:
            shards = listing_shards(self.input_uri, self.storage)
        per_task = -(-len(shards) // MAX_LISTING_TASKS)
        groups = [shards[start : start + per_task] for start in range(0, len(shards), per_task)]
        resumed = ray.put(self.resumed)
        return [
            ListingTask(
                number,
                len(groups),
                group,
                self.storage,
                self.skip,
                resumed,
                self.max_documents,
                self.ledger,
                self.follow_links,
            )
            for number, group in enumerate(groups)
        ]

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [
            ReadTask(task, metadata, schema=REF_SCHEMA, per_task_row_limit=per_task_row_limit) for task in self._tasks
        ]
