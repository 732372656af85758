"""The sink, on the driver: it iterates the plan's output batches (``iter_batches``) and commits a run's rows
to the output's Delta tables (pipeline/tables.py) as its documents complete.

The commit protocol:

1. **Claim.** The run's row in ``runs`` is written with state ``running`` in a commit that carries the
   application transaction (``docqa-run:RUN_ID``, attempt number). Two processes starting the same run id
   at once write the same transaction id: Delta lets one commit and the other fails (it is told another
   attempt started). A run id whose row says ``committed`` is refused.
2. **Parts.** Rows are buffered until their documents are complete (``document_rows``), then, every
   ``commit_rows`` rows or ``commit_interval_s`` seconds, one part: an append to ``answers`` and a replace
   of those documents' rows in ``current`` (``overwrite`` with a ``document IN (...)`` predicate), each one
   Delta commit carrying (``docqa-run:RUN_ID``, part number). Before each commit the table's transaction
   version is read: a part already applied (a retried commit, a resumed run) is never applied twice.
   Every visible row belongs to a document whose rows are all visible.
3. **Resume.** A later attempt of the same run id (after kill -9, a lost driver) finds the parts the dead
   attempt committed: their documents are not processed again, numbering continues after them, and if the
   attempt died between a part's ``answers`` and ``current`` commits, ``current`` is brought up to date.
4. **Record.** At the end the run's ``runs`` row becomes ``committed`` with its record (or ``failed``).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.config import StorageConfig
from pipeline.rows import DOCUMENT_FIELDS, OUTPUT_SCHEMA, Status, rows_to_table
from pipeline.tables import ANSWERS, CURRENT, RUN_SCHEMA, RUNS, OutputTables, sql_string

log = logging.getLogger("docqa")
# A part is also closed at this many documents: its `current` replace names them all in one predicate,
# which delta-rs parses, matches and keeps in the commit's log entry (20,000 documents: 1.1 MB, 1.6 s).
MAX_DOCUMENTS_PER_COMMIT = 2000
PART_BITS = 32  # a commit's transaction version: attempt << PART_BITS | part


class RunExistsError(RuntimeError):
    """The run id is committed already (it is never overwritten), or another process is starting it."""


def app_id(run_id: str) -> str:
    """The application transaction id of a run's commits (Delta's ``txn`` action)."""
    return f"docqa-run:{run_id}"


def split_version(version: int | None) -> tuple[int, int]:
    """(attempt, part) of a part commit's transaction version."""
    version = version or 0
    return version >> PART_BITS, version & ((1 << PART_BITS) - 1)


def incomplete_document_rows(waiting: pa.Table) -> pa.Table:
    """One row per document of ``waiting`` (rows of documents that never arrived whole): the document's
    identity and run fields from its first row, no page or answer, status ``model_error`` (retryable) and
    how many of its rows arrived."""
    kept = {"run_id", "document", *DOCUMENT_FIELDS, "config_fingerprint", "model_id", "model_revision"}
    kept |= {"num_pages", "repaired"}  # the rest (page, question, answer and its values, timings) are nulls
    documents = waiting.column("document").to_pylist()
    arrived = Counter(documents)
    first = {document: index for index, document in reversed(list(enumerate(documents)))}  # first row of each
    rows = []
    for row in waiting.take(list(first.values())).to_pylist():
        expected = row["document_rows"]
        reason = f"incomplete: {arrived[row['document']]} of its {expected} rows arrived; the next run takes it again"
        rows.append(
            {**{name: value if name in kept else None for name, value in row.items()}, "document_rows": 1}
            | {"status": Status.MODEL_ERROR.value, "error": reason}
        )
    return rows_to_table(rows)


def _without(rows: pa.Table, documents: Iterable[str]) -> pa.Table:
    """``rows`` less those of ``documents``."""
    unwanted = pa.array(sorted(documents), pa.string())
    return rows.filter(pc.invert(pc.is_in(rows.column("document"), value_set=unwanted)))


def run_row(run_id: str, run_date: date, state: str, attempt: int, record: dict[str, Any]) -> dict[str, Any]:
    """The run's row in ``runs`` (RUN_SCHEMA) from its record (``RunWriter.commit``'s argument, or the
    fields known at the start)."""
    counts = record.get("counts", {})
    documents, pages = counts.get("documents", {}), counts.get("pages", {})
    started = datetime.fromisoformat(record["started_at"])
    finished = datetime.fromisoformat(record["finished_at"]) if record.get("finished_at") else None
    return {
        "run_id": run_id,
        "run_date": run_date,
        "state": state,
        "attempt": attempt,
        "started_at": started,
        "finished_at": finished,
        # The last attempt's own duration when the record has it (a resumed run started earlier).
        "duration_s": record.get("duration_s") or ((finished - started).total_seconds() if finished else None),
        "input": record.get("input"),
        "model_id": record.get("model", {}).get("id"),
        "config_fingerprint": record.get("incremental", {}).get("config_fingerprint"),
        "documents": sum(documents.values()) if counts else None,
        "failed_documents": sum(n for status, n in documents.items() if status != Status.OK) if counts else None,
        "pages": sum(pages.values()) if counts else None,
        "failed_pages": sum(n for status, n in pages.items() if status != Status.OK) if counts else None,
        "answers": counts.get("answers"),
        "rows": counts.get("rows"),
        "commits": record.get("commits"),
        "degraded": bool(record.get("degraded")),
        "error": record.get("error"),
        "record": json.dumps(record, sort_keys=True, default=str),
    }


class RunWriter:
    """Claims the run, buffers result batches until their documents are complete, commits them in parts,
    then records the run (see the module's docstring). ``recovered``: the rows an earlier attempt of this
    run id committed."""

    def __init__(
        self,
        output: str,
        run_id: str,
        run_date: str,
        storage: StorageConfig,
        start_record: dict[str, Any],
        commit_rows: int = 50_000,
        commit_interval_s: float = 60.0,
    ) -> None:
        self.tables = OutputTables(output, storage)
        self.tables.create()
        self.run_id = run_id
        self.app_id = app_id(run_id)
        self.commit_rows = commit_rows
        self.commit_interval_s = commit_interval_s
        self.start_record = start_record
        self.run_date, self.attempt, self.first_started_at = self._claim(date.fromisoformat(run_date))
        self.recovered = OUTPUT_SCHEMA.empty_table()
        self.part = 0
        if self.attempt > 1:  # a resumed run: what its earlier attempts committed, from its run date's partition
            this_run = (ds.field("run_date") == self.run_date) & (ds.field("run_id") == run_id)
            self.recovered = self.tables.read(ANSWERS, columns=OUTPUT_SCHEMA.names, filter=this_run)
            _, self.part = split_version(self.tables.open(ANSWERS).transaction_version(self.app_id))
            self._repair_current()
        # Documents whose rows are all here (committed or buffered), those of earlier attempts included.
        self.documents_complete = pc.count_distinct(self.recovered.column("document")).as_py()
        self._waiting: pa.Table | None = None  # rows of documents that are not complete yet
        self._settled: set[str] = set()  # documents settled by a row for the whole document
        self._pending: list[pa.Table] = []  # rows of complete documents, not yet committed
        self._pending_rows = 0
        self._pending_documents = 0
        self._last_commit = time.monotonic()

    def _claim(self, run_date: date) -> tuple[date, int, str]:
        """Write the run's ``running`` row under a new attempt number; a resumed run keeps its run date and
        its first start. An attempt still alive is fenced off by the new one: its next commit fails."""
        seen = self.tables.open(RUNS).transaction_version(self.app_id) or 0

        def claim(table) -> tuple[date, int]:
            claimed = table.transaction_version(self.app_id) or 0
            if claimed != seen:
                raise RunExistsError(f"another process started run {self.run_id!r} at the same moment")
            earlier = table.to_pyarrow_dataset().to_table(filter=ds.field("run_id") == self.run_id).to_pylist()
            if earlier and earlier[0]["state"] == "committed":
                raise RunExistsError(
                    f"run {self.run_id!r} is already committed in {self.tables.uri(RUNS)}; pick another id"
                )
            day = earlier[0]["run_date"] if earlier else run_date
            first_started = earlier[0]["started_at"].isoformat() if earlier else self.start_record["started_at"]
            attempt = claimed + 1
            record = {**self.start_record, "started_at": first_started}
            self._merge_run(table, run_row(self.run_id, day, "running", attempt, record), attempt)
            return day, attempt, first_started

        return self.tables.retry_commit(RUNS, claim)

    def _merge_run(self, table, row: dict[str, Any], attempt: int | None = None) -> None:
        from deltalake import CommitProperties, Transaction

        transactions = [Transaction(self.app_id, attempt)] if attempt is not None else None
        (
            table.merge(
                pa.Table.from_pylist([row], schema=RUN_SCHEMA),
                predicate="target.run_id = source.run_id",
                source_alias="source",
                target_alias="target",
                commit_properties=CommitProperties(app_transactions=transactions),
            )
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute()
        )

    def _repair_current(self) -> None:
        """If an earlier attempt died between a part's two commits, put that part's documents into
        ``current``: those of this run's documents whose ``current`` rows are another run's."""
        current = self.tables.open(CURRENT)
        if split_version(current.transaction_version(self.app_id))[1] >= self.part:
            return
        documents = pc.unique(self.recovered.column("document"))
        there = self.tables.read(CURRENT, columns=["document", "run_id"], filter=ds.field("document").isin(documents))
        runs = self.tables.read(RUNS, columns=["run_id", "started_at"]).to_pylist()
        ours = datetime.fromisoformat(self.first_started_at)
        newer = {run["run_id"] for run in runs if run["run_id"] != self.run_id and run["started_at"] > ours}
        # Keep this run's rows, and those of runs started after it (they processed the document later).
        keep = pc.or_(
            pc.equal(there.column("run_id"), self.run_id),
            pc.is_in(there.column("run_id"), pa.array(sorted(newer), pa.string())),
        )
        done = pc.unique(there.filter(keep).column("document"))
        missing = _without(self.recovered, done.to_pylist())
        log.info("run %s: bringing %d row(s) of part %d into current", self.run_id, missing.num_rows, self.part)
        self._replace_current(self._with_run_date(missing), self.part)

    def _with_run_date(self, rows: pa.Table) -> pa.Table:
        return rows.append_column("run_date", pa.array([self.run_date] * rows.num_rows, pa.date32()))

    def _commit_properties(self, part: int):
        from deltalake import CommitProperties, Transaction

        return CommitProperties(
            app_transactions=[Transaction(self.app_id, self.attempt << PART_BITS | part)],
            custom_metadata={"docqa.run_id": self.run_id, "docqa.part": str(part), "docqa.attempt": str(self.attempt)},
        )

    def _applied(self, table, part: int) -> bool:
        """Whether ``part`` is in ``table`` already (a retried commit); refuses to go on when a later attempt of
        this run id has committed there (this attempt was taken over)."""
        attempt, applied = split_version(table.transaction_version(self.app_id))
        if attempt > self.attempt:
            raise RunExistsError(
                f"attempt {attempt} of run {self.run_id!r} took over from this one (attempt {self.attempt}); "
                "this one stops, what it committed is kept"
            )
        return applied >= part

    def _replace_current(self, rows: pa.Table, part: int) -> None:
        from deltalake import write_deltalake

        documents = pc.unique(rows.column("document")).to_pylist()
        predicate = f"document IN ({', '.join(sql_string(document) for document in documents)})"

        def replace(table) -> None:
            if not self._applied(table, part):
                write_deltalake(
                    table, rows, mode="overwrite", predicate=predicate, commit_properties=self._commit_properties(part)
                )

        self.tables.retry_commit(CURRENT, replace)

    def _settle(self, table: pa.Table) -> pa.Table:
        """A row without a page number speaks for its whole document (a long document's page range that
        failed as a whole fails it): the first such row settles the document alone, and the document's other
        rows, waiting here or still to come from its other ranges, are dropped."""
        whole = table.filter(pc.is_null(table.column("page_number")))
        verdicts: dict[str, int] = {}  # each newly settled document: the index of its first such row
        for index, document in enumerate(whole.column("document").to_pylist()):
            if document not in self._settled:
                verdicts.setdefault(document, index)
        self._settled.update(verdicts)
        if self._waiting is not None and verdicts:
            self._waiting = _without(self._waiting, verdicts)
        settled_here = set(table.column("document").to_pylist()) & self._settled
        if not settled_here:
            return table
        return pa.concat_tables([_without(table, settled_here), whole.take(pa.array(verdicts.values(), pa.int64()))])

    def write(self, table: pa.Table) -> None:
        table = self._settle(table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA))
        waiting = table if self._waiting is None else pa.concat_tables([self._waiting, table])
        documents = waiting.column("document").to_pylist()
        expected = dict(zip(documents, waiting.column("document_rows").to_pylist(), strict=True))
        counts = Counter(documents)
        complete = [document for document, rows in expected.items() if counts[document] >= rows]
        if complete:
            mask = pc.is_in(waiting.column("document"), value_set=pa.array(complete))
            done = waiting.filter(mask)
            self._pending.append(done)
            self._pending_rows += done.num_rows
            waiting = waiting.filter(pc.invert(mask))
        self._waiting = waiting if waiting.num_rows else None
        self._pending_documents += len(complete)
        self.documents_complete += len(complete)
        due = time.monotonic() - self._last_commit >= self.commit_interval_s
        full = self._pending_rows >= self.commit_rows or self._pending_documents >= MAX_DOCUMENTS_PER_COMMIT
        if full or (due and self._pending_rows):
            self._commit_part()

    def _commit_part(self) -> None:
        """One part: its rows appended to ``answers``, then its documents replaced in ``current``."""
        from deltalake import write_deltalake

        if not self._pending_rows:
            return
        part = self.part + 1
        rows = self._with_run_date(pa.concat_tables(self._pending))

        def append(table) -> None:
            if not self._applied(table, part):
                write_deltalake(
                    table,
                    rows,
                    mode="append",
                    partition_by=["run_date"],
                    commit_properties=self._commit_properties(part),
                )

        self.tables.retry_commit(ANSWERS, append)
        self._replace_current(rows, part)
        self.part = part
        self._pending, self._pending_rows, self._pending_documents = [], 0, 0
        self._last_commit = time.monotonic()

    def commit(self, record: dict[str, Any]) -> str:
        """Commit what is buffered, then mark the run ``committed`` with its record. Returns the output."""
        if self._waiting is not None:
            # Should not happen. If it does, no reader may see a document in part: each incomplete document
            # is committed as one retryable row that says so, and the next run takes it again.
            incomplete = incomplete_document_rows(self._waiting)
            log.warning(
                "%d document(s) arrived incomplete and will be taken again by the next run: %s",
                incomplete.num_rows,
                incomplete.column("document").to_pylist()[:5],
            )
            self._pending.append(incomplete)
            self._pending_rows += incomplete.num_rows
            self._waiting = None
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
                raise RunExistsError(f"attempt {claimed} of run {self.run_id!r} took over from this one")
            self._merge_run(table, row)

        self.tables.retry_commit(RUNS, finish)

    def fail(self, error: str) -> None:
        """Commit the complete documents buffered so far (a rerun skips them) and mark the run ``failed``."""
        self._commit_part()
        self._finish("failed", {**self.start_record, "finished_at": datetime.now(UTC).isoformat(), "error": error})
