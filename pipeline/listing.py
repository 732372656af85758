"""The listing stage: the input's documents as ``DocumentRef`` records, found as the listing goes.

``DocumentListing`` is the Ray Data source (``read_datasource``): the input cut into shards (a folder's
subfolders, a prefix's subprefixes: pipeline/locations.py), one read task each, a few at a time, each
yielding the documents it takes; those whose (URI, version) has committed results already are skipped
(``KnownVersions``), and a run's ``max_documents`` is counted by the run's ledger. Reading bytes is the
planning stage's.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.config import StorageConfig
from pipeline.locations import ListingShard, first_time, iter_shard, listing_shards, never
from pipeline.records import REF_SCHEMA, DocumentRef, to_table


class KnownVersions:
    """The (URI, version) pairs that need no processing, as a sorted array of 64-bit hashes: 8 bytes a
    document, so a million of them pickle to the listing task in milliseconds (a set of string pairs would
    take ~300 MB). A false match needs a 64-bit collision among them: about 1 in 10^13 for a million."""

    def __init__(self, documents: Sequence[str] = (), versions: Sequence[str] = ()) -> None:
        hashes = np.fromiter(
            (self._hash(uri, version) for uri, version in zip(documents, versions, strict=True)),
            dtype=np.uint64,
            count=len(documents),
        )
        self.hashes = np.unique(hashes)

    @staticmethod
    def _hash(uri: str, version: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"{uri}\0{version}".encode(), digest_size=8).digest(), "little")

    def __len__(self) -> int:
        return len(self.hashes)

    def __contains__(self, pair: tuple[str, str]) -> bool:
        value = np.uint64(self._hash(*pair))
        index = int(np.searchsorted(self.hashes, value))
        return index < len(self.hashes) and self.hashes[index] == value


# Listing tasks that run at once: a shard's task waits on directory or object-store pages, and holds no CPU
# (jobs/run.py), so a few of them overlap those waits without taking much from the render tasks.
LISTING_TASKS_AT_ONCE = 4
# More shards than this are walked a few to a task (a bucket of 100,000 prefixes is not 100,000 Ray tasks).
MAX_LISTING_TASKS = 2000


@dataclass(frozen=True)
class ListingTask:
    """What one listing task needs: its shards and the run's settings; the known versions travel through
    the object store once (``known``), not in every task."""

    number: int
    tasks: int
    shards: list[ListingShard]
    storage: StorageConfig
    known: Any  # ObjectRef of (completed, resumed) KnownVersions
    max_documents: int | None
    ledger: Any
    follow_links: bool = False

    def __call__(self) -> Iterator[pa.Table]:
        import ray

        completed, resumed = ray.get(self.known)
        counts = {"taken": 0, "resumed": 0, "unchanged": 0, "left": 0}
        claim, take = self._claim(), self._take()
        reported = time.monotonic()
        for ref in (ref for shard in self.shards for ref in iter_shard(shard, self.storage, claim)):
            known = ref.source_version is not None
            if known and (ref.document, ref.source_version) in resumed:
                counts["resumed"] += 1
            elif known and (ref.document, ref.source_version) in completed:
                counts["unchanged"] += 1
            elif not take(ref.document):
                counts["left"] += 1
            else:
                counts["taken"] += 1
                yield to_table([ref], DocumentRef)
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

    Documents whose (URI, version) already has committed results are skipped (``completed``: a committed
    run's; ``resumed``: an earlier attempt of this run's, which count as done by this run); past
    ``max_documents`` (counted by the ledger) the rest are only counted: then the tasks run one at a time,
    in listing order, so the documents taken are the first ones listed. The counts go to the run's ledger
    as the listing grows (at most once a second per task) and once more when a task is done: the driver's
    progress line shows them. Without a ledger the listing is one task."""

    def __init__(
        self,
        input_uri: str,
        storage: StorageConfig,
        completed: KnownVersions | None = None,
        max_documents: int | None = None,
        ledger=None,
        resumed: KnownVersions | None = None,
        follow_links: bool = False,
    ) -> None:
        super().__init__()
        self.follow_links = follow_links
        self.input_uri = input_uri
        self.storage = storage
        self.known = (completed or KnownVersions(), resumed or KnownVersions())
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
        known = ray.put(self.known)
        return [
            ListingTask(
                number, len(groups), group, self.storage, known, self.max_documents, self.ledger, self.follow_links
            )
            for number, group in enumerate(groups)
        ]

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [
            ReadTask(task, metadata, schema=REF_SCHEMA, per_task_row_limit=per_task_row_limit) for task in self._tasks
        ]
