"""The writing stage, on the driver: ``RunWriter`` iterates the plan's answer rows (``iter_batches``),
keeps them until their documents are complete, and commits them to the output's Delta tables in parts
(pipeline/tables.py), following the commit protocol of pipeline/commits.py: claim, fence, parts, heartbeat,
record. A document is complete when each of its (page, question) keys has arrived (``DocumentBuffer``); a
row without a page that speaks for its whole document (``scope`` ``document``) settles it alone."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.commits import (
    RunExistsError,
    RunFence,
    app_id,
    merge_run,
    repair_ended,
    run_row,
    run_rows,
    take_over_abandoned,
    taken_over,
    without,
)
from pipeline.config import StorageConfig
from pipeline.records import DOCUMENT, IDENTITY, OUTPUT_SCHEMA, Status, rows_to_table
from pipeline.tables import ANSWERS, DEFAULT_LEASE_S, RUNS, OutputTables, sql_string

log = logging.getLogger("docqa")
# A part is also closed at this many documents: its `current` replace names them all in one predicate,
# which delta-rs parses, matches and keeps in the commit's log entry (20,000 documents: 1.1 MB, 1.6 s).
MAX_DOCUMENTS_PER_COMMIT = 2000
HEARTBEATS_PER_LEASE = 5


def incomplete_document_rows(waiting: pa.Table) -> pa.Table:
    """One row per document of ``waiting`` (rows of documents that never arrived whole): the document's
    identity and run fields from its first row, no page or answer, status ``model_error`` (retryable) and
    how many of its (page, question) keys arrived."""
    kept = {"run_id", *IDENTITY, "config_fingerprint", "model_id", "model_revision"}
    kept |= {"num_pages", "repaired", "source_format"}  # the rest (page, question, answer, values, timings): nulls
    columns = waiting.select(["document", "page_number", "question_id"]).to_pydict()
    keys: dict[str, set[tuple[Any, Any]]] = {}
    first: dict[str, int] = {}
    for index, (document, page, question) in enumerate(zip(*columns.values(), strict=True)):
        keys.setdefault(document, set()).add((page, question))
        first.setdefault(document, index)
    rows = []
    for row in waiting.take(list(first.values())).to_pylist():
        expected = row["document_rows"]
        arrived = len(keys[row["document"]])
        reason = f"incomplete: {arrived} of its {expected} rows arrived; the next run takes it again"
        rows.append(
            {**{name: value if name in kept else None for name, value in row.items()}, "document_rows": 1}
            | {"status": Status.MODEL_ERROR.value, "error": reason, "scope": DOCUMENT}
        )
    return rows_to_table(rows)


def _of(rows: pa.Table, documents) -> pa.Table:
    """The rows of ``documents`` only."""
    return rows.filter(pc.is_in(rows.column("document"), value_set=pa.array(list(documents), pa.string())))


class DocumentBuffer:
    """Rows of documents that are not complete yet, and the (page, question) keys each document has: a
    document is complete once it holds ``document_rows`` distinct keys. A row whose key its document already
    has (a task that Ray ran again, say) is dropped, and so is every later row of a document that completed
    already (its rows went on to be committed): the completed documents are remembered (one entry per
    document, as the run's statistics keep), so a task run again after its documents completed neither
    re-opens them nor commits them twice.

    A batch's rows of documents it completes (most of them) go straight on; the rows of documents still
    incomplete are kept as one chunk, and each document remembers its rows' places in the chunks, so that
    completing it takes just its rows: one take over the chunks that hold them. So a batch costs time linear
    in the batch and in those chunks, never a pass over everything that waits (before, every batch
    concatenated all of it); it still grows with the rows waiting, as the chunks a batch touches do
    (BENCHMARKS.md, "The driver's writer": 3.5 ms per 600-row batch in the first tenth of a run whose rows
    interleave over 100,000 documents, 30 to 50 ms in its last). A chunk whose rows are mostly gone is
    compacted, so memory stays linear in the rows waiting, plus one entry per completed document."""

    COMPACT_MIN_ROWS = 256  # chunks smaller than this are left as they are until they empty

    def __init__(self) -> None:
        self.keys: dict[str, set[tuple[Any, Any]]] = {}  # each incomplete document's keys so far
        self.places: dict[str, dict[int, list[int]]] = {}  # each incomplete document's rows: chunk -> row indices
        self.chunks: dict[int, pa.Table] = {}
        self.live: dict[int, int] = {}  # rows of a chunk still waiting
        self.documents_in: dict[int, set[str]] = {}
        self.completed: set[str] = set()  # documents whose rows all went out: any later row of theirs is dropped
        self._next_chunk = 0
        self.duplicates = 0  # rows dropped: their key had arrived already, or their document had completed

    @property
    def rows(self) -> int:
        """Rows waiting."""
        return sum(self.live.values())

    def drop(self, documents) -> None:
        """Forget ``documents`` and their waiting rows (settled as a whole elsewhere)."""
        self._gather([document for document in documents if document in self.keys])

    def add(self, table: pa.Table, known: Callable[[str], set[tuple[Any, Any]] | None] = lambda _: None) -> pa.Table:
        """Take ``table``'s rows; returns every row of the documents they complete (each key once).
        ``known``: the keys a document already has elsewhere (rows committed by an earlier attempt)."""
        columns = table.select(["document", "page_number", "question_id", "document_rows"]).to_pydict()
        keep = []
        expected: dict[str, int] = {}
        for document, page, question, rows in zip(*columns.values(), strict=True):
            if document in self.completed:
                keep.append(False)
                continue
            keys = self.keys.get(document)
            if keys is None:
                keys = self.keys[document] = set(known(document) or ())
            key = (page, question)
            keep.append(key not in keys)
            keys.add(key)
            expected[document] = rows
        if not all(keep):
            self.duplicates += keep.count(False)
            table = table.filter(pa.array(keep, pa.bool_()))
        complete = [document for document, rows in expected.items() if len(self.keys[document]) >= rows]
        for document in complete:
            del self.keys[document]
        self.completed.update(complete)
        finished = set(complete)
        waiting = [document for document in expected if document not in finished]
        if not complete:
            self._keep(table)
            return table.slice(0, 0)
        done = [_of(table, complete) if waiting else table, *self._gather([d for d in complete if d in self.places])]
        if waiting:
            self._keep(_of(table, waiting))
        return pa.concat_tables(done) if len(done) > 1 else done[0]

    def _keep(self, table: pa.Table) -> None:
        """Keep ``table`` (rows of incomplete documents) as a chunk, each row's place noted by its document."""
        if not table.num_rows:
            return
        chunk = self._next_chunk
        self._next_chunk += 1
        self.chunks[chunk], self.live[chunk], self.documents_in[chunk] = table, table.num_rows, set()
        for index, document in enumerate(table.column("document").to_pylist()):
            self.places.setdefault(document, {}).setdefault(chunk, []).append(index)
            self.documents_in[chunk].add(document)

    def _gather(self, documents: list[str]) -> list[pa.Table]:
        """The waiting rows of ``documents``, taken out of their chunks (one take per chunk)."""
        by_chunk: dict[int, list[int]] = {}
        for document in documents:
            self.keys.pop(document, None)
            for chunk, indices in self.places.pop(document, {}).items():
                by_chunk.setdefault(chunk, []).extend(indices)
                self.documents_in[chunk].discard(document)
        if not by_chunk:
            return []
        # One take over the touched chunks side by side (a zero-copy concatenation), not one per chunk.
        offset, places = 0, []
        for chunk, indices in by_chunk.items():
            places += [offset + index for index in indices] if offset else indices
            offset += self.chunks[chunk].num_rows
        touched = pa.concat_tables([self.chunks[chunk] for chunk in by_chunk])
        taken = touched.take(pa.array(places, pa.int64()))
        for chunk, indices in by_chunk.items():
            self.live[chunk] -= len(indices)
            if not self.live[chunk]:
                del self.chunks[chunk], self.live[chunk], self.documents_in[chunk]
            elif (
                self.chunks[chunk].num_rows >= self.COMPACT_MIN_ROWS
                and 2 * self.live[chunk] < self.chunks[chunk].num_rows
            ):
                self._compact(chunk)
        return [taken]

    def _compact(self, chunk: int) -> None:
        """Rewrite a chunk with only its waiting rows, and renumber their places."""
        order: list[int] = []
        for document in sorted(self.documents_in[chunk]):
            indices = self.places[document][chunk]
            self.places[document][chunk] = list(range(len(order), len(order) + len(indices)))
            order += indices
        self.chunks[chunk] = self.chunks[chunk].take(pa.array(order, pa.int64()))

    def remaining(self) -> pa.Table | None:
        """Every row still waiting (documents that never arrived whole), taken out; None when none waits."""
        tables = self._gather(list(self.places))
        self.keys.clear()
        return pa.concat_tables(tables) if tables else None


class RunWriter:
    """Claims the run, buffers result batches until their documents are complete, commits them in parts,
    keeps its lease, then records the run (see the module's docstring). ``recovered``: the rows earlier
    attempts of this run id committed."""

    def __init__(
        self,
        output: str,
        run_id: str,
        run_date: str,
        storage: StorageConfig,
        start_record: dict[str, Any],
        commit_rows: int = 50_000,
        commit_interval_s: float = 60.0,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        self.tables = OutputTables(output, storage)
        self.tables.create()
        self.run_id = run_id
        self.app_id = app_id(run_id)
        self.commit_rows = commit_rows
        self.commit_interval_s = commit_interval_s
        self.lease_s = lease_s
        self.start_record = start_record
        self._runs_lock = threading.Lock()  # the heartbeat's commits and the driver's, one at a time
        self.run_date, self.attempt, self.first_started_at = self._claim(date.fromisoformat(run_date))
        self.fence = RunFence(self.tables, run_id, self.run_date, self.attempt, self.first_started_at)
        self.recovered = OUTPUT_SCHEMA.empty_table()
        self.part = 0
        if self.attempt > 1:  # a resumed run: what its earlier attempts committed is adopted, and they are fenced off
            self.part, self.recovered = self.fence.adopt()
        self.abandoned = take_over_abandoned(self.tables, but=run_id)
        self.repaired_runs = repair_ended(self.tables, but=run_id)  # ended runs whose `current` lagged their parts
        self._recovered_keys = self._keys_by_document(self.recovered)
        # Documents whose rows are all here (committed or buffered), those of earlier attempts included.
        self.documents_complete = len(self._recovered_keys)
        self._buffer = DocumentBuffer()
        self._settled: set[str] = set()  # documents settled by a row for the whole document
        self._pending: list[pa.Table] = []  # rows of complete documents, not yet committed
        self._pending_rows = 0
        self._pending_documents = 0
        self._last_commit = time.monotonic()
        self._heartbeat = threading.Event()
        self._heartbeat_thread = threading.Thread(target=self._beat, name="docqa-run-heartbeat", daemon=True)
        self._heartbeat_thread.start()

    @staticmethod
    def _keys_by_document(rows: pa.Table) -> dict[str, set[tuple[Any, Any]]]:
        keys: dict[str, set[tuple[Any, Any]]] = {}
        columns = rows.select(["document", "page_number", "question_id"]).to_pydict()
        for document, page, question in zip(*columns.values(), strict=True):
            keys.setdefault(document, set()).add((page, question))
        return keys

    def _claim(self, run_date: date) -> tuple[date, int, str]:
        """Write the run's ``running`` row under a new attempt number; a resumed run keeps its run date and
        its first start."""
        seen = self.tables.open(RUNS).transaction_version(self.app_id) or 0

        def claim(table) -> tuple[date, int, str]:
            claimed = table.transaction_version(self.app_id) or 0
            if claimed != seen:
                raise RunExistsError(f"another process started run {self.run_id!r} at the same moment")
            earlier = run_rows(self.tables, table, self.run_id)
            if earlier and earlier[0]["state"] == "committed":
                raise RunExistsError(
                    f"run {self.run_id!r} is already committed in {self.tables.uri(RUNS)}; pick another id"
                )
            day = earlier[0]["run_date"] if earlier else run_date
            first_started = earlier[0]["started_at"].isoformat() if earlier else self.start_record["started_at"]
            attempt = max(claimed, earlier[0]["attempt"] if earlier else 0) + 1
            record = {**self.start_record, "started_at": first_started}
            merge_run(table, run_row(self.run_id, day, "running", attempt, record, self.lease_s), attempt)
            return day, attempt, first_started

        return self.tables.retry_commit(RUNS, claim)

    def _beat(self) -> None:
        """Move the lease forward every ``lease_s / 5`` until the run ends or another attempt takes over."""
        while not self._heartbeat.wait(self.lease_s / HEARTBEATS_PER_LEASE):
            try:
                with self._runs_lock:
                    if self._heartbeat.is_set() or not self.tables.retry_commit(RUNS, self._renew):
                        return
            except Exception as error:  # noqa: BLE001 - a missed beat is retried; the lease has room for several
                log.warning("run %s: could not renew its lease: %s", self.run_id, error)

    def _renew(self, table) -> bool:
        if (table.transaction_version(self.app_id) or 0) != self.attempt:
            return False  # taken over: its next commit stops this attempt
        from deltalake import CommitProperties, Transaction

        table.update(
            new_values={"lease_expires_at": datetime.now(UTC) + timedelta(seconds=self.lease_s)},
            predicate=f"run_id = {sql_string(self.run_id)}",
            commit_properties=CommitProperties(app_transactions=[Transaction(self.app_id, self.attempt)]),
        )
        return True

    def _settle(self, table: pa.Table) -> pa.Table:
        """A row whose scope is its whole document (a long document's page range that failed as a whole fails
        it): the first such row settles the document alone, and the document's other rows, waiting here or
        still to come from its other ranges, are dropped."""
        whole = table.filter(pc.equal(table.column("scope"), DOCUMENT))
        verdicts: dict[str, int] = {}  # each newly settled document: the index of its first such row
        for index, document in enumerate(whole.column("document").to_pylist()):
            if document not in self._settled:
                verdicts.setdefault(document, index)
        self._settled.update(verdicts)
        self._buffer.drop(verdicts)
        settled_here = set(table.column("document").to_pylist()) & self._settled
        if not settled_here:
            return table
        return pa.concat_tables([without(table, settled_here), whole.take(pa.array(verdicts.values(), pa.int64()))])

    def write(self, table: pa.Table) -> pa.Table:
        """Take a result batch; returns the rows of the documents it completed (each (page, question) once),
        as they will be committed."""
        table = self._settle(table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA))
        done = self._buffer.add(table, self._recovered_keys.get)
        if done.num_rows:
            documents = pc.count_distinct(done.column("document")).as_py()
            self._pending.append(done)
            self._pending_rows += done.num_rows
            self._pending_documents += documents
            self.documents_complete += documents
        due = time.monotonic() - self._last_commit >= self.commit_interval_s
        full = self._pending_rows >= self.commit_rows or self._pending_documents >= MAX_DOCUMENTS_PER_COMMIT
        if full or (due and self._pending_rows):
            self._commit_part()
        return done

    @property
    def duplicates(self) -> int:
        """Rows dropped: their (document, page, question) had arrived already, or their document completed."""
        return self._buffer.duplicates

    def _commit_part(self) -> None:
        """One part: its rows appended to ``answers``, then its documents replaced in ``current``."""
        from deltalake import write_deltalake

        if not self._pending_rows:
            return
        part = self.part + 1
        rows = self.fence.with_run_date(pa.concat_tables(self._pending))

        def append(table) -> None:
            if not self.fence.applied(table, part):
                write_deltalake(
                    table, rows, mode="append", partition_by=["run_date"], commit_properties=self.fence.properties(part)
                )

        try:
            self.tables.retry_commit(ANSWERS, append)
            self.fence.replace_current(rows, part)
            self.fence.replace_items(rows, part)
        except RunExistsError:
            self._heartbeat.set()  # taken over: the lease is the new attempt's
            raise
        self.part = part
        self._pending, self._pending_rows, self._pending_documents = [], 0, 0
        self._last_commit = time.monotonic()

    def commit(self, record: dict[str, Any]) -> str:
        """Commit what is buffered, then mark the run ``committed`` with its record. Returns the output."""
        waiting = self._buffer.remaining()
        if waiting is not None:
            # Should not happen. If it does, no reader may see a document in part: each incomplete document
            # is committed as one retryable row that says so, and the next run takes it again.
            incomplete = incomplete_document_rows(waiting)
            log.warning(
                "%d document(s) arrived incomplete and will be taken again by the next run: %s",
                incomplete.num_rows,
                incomplete.column("document").to_pylist()[:5],
            )
            self._pending.append(incomplete)
            self._pending_rows += incomplete.num_rows
            self._buffer = DocumentBuffer()
        self._commit_part()
        self._finish("committed", record)
        return self.tables.output

    def _finish(self, state: str, record: dict[str, Any]) -> None:
        """Write the run's final row in ``state``, unless a later attempt has claimed the run meanwhile."""
        record = {**record, "started_at": self.first_started_at, "commits": self.part}
        row = run_row(self.run_id, self.run_date, state, self.attempt, record)

        def finish(table) -> None:
            claimed = table.transaction_version(self.app_id) or 0
            if claimed > self.attempt:
                raise taken_over(self.run_id, self.attempt, claimed)
            merge_run(table, row, self.attempt)

        self._heartbeat.set()
        with self._runs_lock:
            self.tables.retry_commit(RUNS, finish)

    def fail(self, error: str) -> None:
        """Commit the complete documents buffered so far (a rerun skips them) and mark the run ``failed``."""
        try:
            self._commit_part()
        finally:
            self._finish("failed", {**self.start_record, "finished_at": datetime.now(UTC).isoformat(), "error": error})
