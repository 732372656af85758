"""Which listed documents a run skips: those whose rows in ``current`` are complete and final for the run's
config. Decided in the listing tasks, a batch of listed documents at a time (``SkipDecision.completed``), so
that no process holds every committed document's version: a batch reads from ``current`` (as of the run's
start) only the files whose statistics on ``document`` overlap the batch's URIs, and of those only the
batch's rows and the columns the decision needs. The driver decides what is per run (the fingerprint, the
statuses a changed setting reopens: jobs/incremental.py) and hands that on.

Files overlap few batches when ``current`` is clustered by URI: a run commits documents roughly in listing
order (listing shards are walked a few at a time, in order), and ``docqa optimize`` compacts them sorted.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.config import StorageConfig
from pipeline.fingerprints import OCR_SETTING
from pipeline.records import RETIRED_STATUSES, RETRYABLE, Status
from pipeline.tables import CURRENT, OutputTables
from pipeline.text_layer import OCR

# Listed documents decided together: one read of `current` per batch (a few tens of milliseconds of log
# and statistics work), a few MiB of rows at most.
SKIP_BATCH_DOCUMENTS = 10_000
DECISION_COLUMNS = [
    "document",
    "source_version",
    "document_rows",
    "status",
    "run_id",
    "text_source",
    "text_layer_chars",
]


class KnownVersions:
    """A set of (URI, version) pairs as a sorted array of 64-bit hashes: 8 bytes a document, so a million of
    them pickle in milliseconds (a set of string pairs would take ~300 MB). A false match needs a 64-bit
    collision among them: about 1 in 10^13 for a million."""

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


@dataclass(frozen=True)
class SkipDecision:
    """What a listing task needs to decide which of its documents are done: the output and the version of
    ``current`` at the run's start (None: no table, nothing is done), the config's fingerprint, the
    statuses that are never final (``retake``: retryable, retired; with ``reprocess: failed`` every status
    but ok, given as ``retake_all_but_ok``), and, per status a setting decides, the runs whose recorded
    setting differs from this config's (``reopened``: their rows of that status are taken again; for the
    OCR setting, their pages read without a usable text layer, ``min_chars``)."""

    output: str
    storage: StorageConfig
    version: int | None
    fingerprint: str
    retake: tuple[str, ...] = tuple(sorted(RETRYABLE | RETIRED_STATUSES))
    retake_all_but_ok: bool = False
    reopened: dict[str, list[str]] = field(default_factory=dict)
    min_chars: int = 0

    def completed(self, documents: Sequence[str]) -> KnownVersions:
        """Of ``documents`` (listed URIs), the (URI, version) pairs whose rows in ``current`` are complete and
        final: reads only the files whose URI statistics overlap them, and decides in Arrow."""
        rows = self._rows(documents) if self.version is not None and documents else None
        if rows is None:
            return KnownVersions()
        status = rows.column("status")
        if self.retake_all_but_ok:
            retake = pc.not_equal(status, Status.OK.value)
        else:
            retake = pc.is_in(status, value_set=pa.array(self.retake, pa.string()))
        for decided, run_ids in self.reopened.items():
            by_run = pc.is_in(rows.column("run_id"), pa.array(run_ids, pa.string()))
            if decided == OCR_SETTING:
                retake = pc.or_(retake, pc.and_(_read_without_text_layer(rows, self.min_chars), by_run))
            else:
                retake = pc.or_(retake, pc.and_(pc.equal(status, decided), by_run))
        groups = (
            rows.append_column("retake", pc.cast(retake, pa.int8()))
            .group_by(["document", "source_version"])
            .aggregate([("status", "count"), ("document_rows", "max"), ("retake", "max")])
        )
        final = groups.filter(
            pc.and_(
                pc.greater_equal(groups.column("status_count"), groups.column("document_rows_max")),
                pc.equal(groups.column("retake_max"), 0),
            )
        )
        return KnownVersions(final.column("document").to_pylist(), final.column("source_version").to_pylist())

    @functools.cached_property
    def _current(self) -> tuple[OutputTables, Any]:
        """The output's tables and ``current`` at the run's starting version (None: no such table), loaded
        once per listing task: its log is replayed once, not once per batch."""
        tables = OutputTables(self.output, self.storage)
        return tables, tables.open(CURRENT, self.version)

    def _rows(self, documents: Sequence[str]) -> pa.Table | None:
        """The decision's columns of ``documents``' rows in ``current`` under this fingerprint (None: no such
        table); only the files whose statistics on ``document`` overlap the batch's range are opened."""
        tables, table = self._current
        if table is None:
            return None
        low, high = min(documents), max(documents)
        dataset = tables.pruned_files_of(table, CURRENT, [("document", ">=", low), ("document", "<=", high)])
        # The batch's documents are picked after the read, not in the scan's filter: Arrow checks a filter on a
        # column against each row group's statistics, and files rewritten by delta-rs keep theirs as string_view,
        # which Arrow cannot compare with a string (an error, not a slow read).
        wanted = (ds.field("config_fingerprint") == self.fingerprint) & ds.field("source_version").is_valid()
        rows = dataset.to_table(columns=DECISION_COLUMNS, filter=wanted)
        return rows.filter(pc.is_in(rows.column("document"), value_set=pa.array(documents, pa.string())))


def _read_without_text_layer(rows: pa.Table, min_chars: int) -> pa.ChunkedArray:
    """Rows of pages whose words are not a PDF's own usable text layer: OCR'd, or without words (rows written
    before ``text_source`` existed: fewer than ``min_chars`` characters of text)."""
    source = rows.column("text_source")
    few_characters = pc.less(pc.fill_null(rows.column("text_layer_chars"), 0), min_chars)
    unknown = pc.and_(pc.is_null(source), few_characters)
    return pc.and_(pc.equal(rows.column("status"), Status.OK.value), pc.or_(pc.equal(source, OCR), unknown))
