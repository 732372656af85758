"""The commit protocol of a run's writer (pipeline/writing.py), and what any run does for a dead one.

Every commit a run makes to a table carries Delta's application transaction
(``docqa-run:RUN_ID``, version ``attempt << 32 | part``). Delta refuses a commit whose snapshot is older than
another commit carrying the same application id (``ConcurrentTransaction``): so for one run id, "read the
table's transaction version, decide, commit" is atomic in every table, and each decision below is taken on
the state it commits against.

1. **Claim.** The run's row in ``runs`` is written with state ``running``, a new attempt number and a lease
   (``lease_expires_at``), in a commit carrying (RUN_ID, attempt). A run id whose row says ``committed`` is
   refused; of two processes claiming the same attempt at once, one fails.
2. **Fence.** An attempt after the first writes a commit carrying (attempt, p) into ``answers``, then into
   ``current``, then into ``items``, where p is the last part an earlier attempt applied to ``answers``: it
   adopts parts 1..p (their documents are done, numbering goes on after them) and, if an earlier attempt
   died between a part's commits, the same commits bring those documents into ``current`` and their records
   into ``items``. From then on an earlier attempt's commits are refused, whatever the order: it reads a
   newer attempt and stops.
3. **Parts.** Rows wait until their documents are complete: every (page, question) of the document present,
   counted by key, not by rows (a duplicated row, a retried task's, is dropped and never hides a missing
   one; so is any row of a document that completed already). Every ``commit_rows`` rows or
   ``commit_interval_s`` seconds, one part, three commits in this order: an append to ``answers``, a
   replace of its documents' rows in ``current``, a replace of their records in ``items``. A part counts as
   applied in a table only where this attempt applied it (a retried commit after a lost response is
   recognised); never because of another attempt's commit.
4. **Heartbeat.** While the run lives its driver moves its lease forward (every ``lease_s / 5``) in a commit
   carrying (RUN_ID, attempt). The next run on the output (any run id) takes over a ``running`` run whose
   lease has passed: it marks it ``abandoned`` under a new attempt number, which fences the dead attempt's
   writer out if it was only frozen, and repairs ``current`` and ``items`` from the parts it committed
   (step 2). It also repairs a run that ended (``failed``, or ``abandoned`` by a run that died before its
   repair) whose last commit in ``answers`` is newer than its last in ``current`` or ``items``
   (``repair_ended``); a run whose lease lives is left to its own writer.
5. **Record.** At the end the run's row becomes ``committed`` with its record (or ``failed``).

The invariant, which tests/test_integrity.py checks over every interleaving of two attempts' commits: after
the last attempt commits, every document of the run is in ``answers`` exactly once per (page, question),
all from one attempt, ``current`` holds, for each document, the rows of the latest run that processed it,
and ``items`` the records of exactly those rows. Every visible row belongs to a document whose rows are all
visible. A part is three commits (``answers``, ``current``, ``items``); a writer that stops between two of
them leaves the later tables behind ``answers`` only until the next attempt of its run id, or the next run
on the output under any run id (once the dead writer's lease has passed, or at once when it ended ``failed``),
repairs them (steps 2 and 4).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.records import OUTPUT_SCHEMA, Status
from pipeline.structured import document_items
from pipeline.tables import (
    ANSWERS,
    CURRENT,
    ITEMS,
    RUN_SCHEMA,
    RUNS,
    OutputTables,
    TableError,
    lease_expired,
    sql_string,
)

log = logging.getLogger("docqa")
PART_BITS = 32  # a commit's transaction version: attempt << PART_BITS | part


class RunExistsError(RuntimeError):
    """The run id is committed already (it is never overwritten), or another attempt of it took over."""


def app_id(run_id: str) -> str:
    """The application transaction id of a run's commits (Delta's ``txn`` action)."""
    return f"docqa-run:{run_id}"


def split_version(version: int | None) -> tuple[int, int]:
    """(attempt, part) of a part commit's transaction version."""
    version = version or 0
    return version >> PART_BITS, version & ((1 << PART_BITS) - 1)


def commit_properties(run_id: str, attempt: int, part: int):
    """What every part and fence commit of (run, attempt) carries: the application transaction, and the
    same facts as readable commit metadata (``DeltaTable.history()``)."""
    from deltalake import CommitProperties, Transaction

    return CommitProperties(
        app_transactions=[Transaction(app_id(run_id), attempt << PART_BITS | part)],
        custom_metadata={"docqa.run_id": run_id, "docqa.part": str(part), "docqa.attempt": str(attempt)},
    )


def taken_over(run_id: str, attempt: int, by: int) -> RunExistsError:
    return RunExistsError(
        f"attempt {by} of run {run_id!r} took over from this one (attempt {attempt}); this one stops, what it "
        "committed is kept"
    )


def without(rows: pa.Table, documents) -> pa.Table:
    """``rows`` less those of ``documents``."""
    unwanted = pa.array(sorted(documents), pa.string())
    return rows.filter(pc.invert(pc.is_in(rows.column("document"), value_set=unwanted)))


def run_row(
    run_id: str, run_date: date, state: str, attempt: int, record: dict[str, Any], lease_s: float | None = None
) -> dict[str, Any]:
    """The run's row in ``runs`` (RUN_SCHEMA) from its record (``RunWriter.commit``'s argument, or the
    fields known at the start); ``lease_s``: the lease of a running run, from now."""
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
        "lease_expires_at": None if lease_s is None else datetime.now(UTC) + timedelta(seconds=lease_s),
    }


def merge_run(table, row: dict[str, Any], attempt: int | None = None) -> None:
    """Insert or replace one run's row in ``runs``; with ``attempt``, the commit carries (RUN_ID, attempt)."""
    from deltalake import CommitProperties, Transaction

    transactions = [Transaction(app_id(row["run_id"]), attempt)] if attempt is not None else None
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


def run_rows(tables: OutputTables, table, run_id: str) -> list[dict[str, Any]]:
    """Run ``run_id``'s row in this snapshot of ``runs`` (none or one)."""
    return tables.files_of(table, RUNS).to_table(filter=ds.field("run_id") == run_id).to_pylist()


class RunFence:
    """One attempt's hold on a run id's commits in ``answers`` and ``current`` (steps 2 and 3 of the
    protocol): what it adopts of earlier attempts, and whether a part of its own is applied already."""

    def __init__(self, tables: OutputTables, run_id: str, run_date: date, attempt: int, started_at: str) -> None:
        self.tables = tables
        self.run_id = run_id
        self.run_date = run_date
        self.attempt = attempt
        self.started_at = started_at
        self.app_id = app_id(run_id)

    def check(self, table) -> tuple[int, int]:
        """(attempt, part) of the table's last commit of this run id; raises when a later attempt wrote it."""
        attempt, part = split_version(table.transaction_version(self.app_id))
        if attempt > self.attempt:
            raise taken_over(self.run_id, self.attempt, attempt)
        return attempt, part

    def applied(self, table, part: int) -> bool:
        """Whether this attempt applied ``part`` to ``table`` already (a retried commit)."""
        attempt, applied = self.check(table)
        return attempt == self.attempt and applied >= part

    def properties(self, part: int):
        return commit_properties(self.run_id, self.attempt, part)

    def adopt(self) -> tuple[int, pa.Table]:
        """Fence ``answers`` then ``current`` against earlier attempts; returns the last part they applied and
        the rows they committed (the run date's partition), read from the snapshot the fence commits on."""
        from deltalake import write_deltalake

        this_run = (ds.field("run_date") == self.run_date) & (ds.field("run_id") == self.run_id)

        def fence_answers(table) -> tuple[int, pa.Table]:
            _, part = self.check(table)
            rows = self.tables.files_of(table, ANSWERS).to_table(columns=OUTPUT_SCHEMA.names, filter=this_run)
            empty = self.with_run_date(OUTPUT_SCHEMA.empty_table())
            write_deltalake(table, empty, mode="append", commit_properties=self.properties(part))
            return part, rows

        part, rows = self.tables.retry_commit(ANSWERS, fence_answers)
        self.replace_current(rows, part, repair=True)
        self.replace_items(rows, part, repair=True)
        return part, rows

    def with_run_date(self, rows: pa.Table) -> pa.Table:
        return rows.append_column("run_date", pa.array([self.run_date] * rows.num_rows, pa.date32()))

    def replace_current(self, rows: pa.Table, part: int, repair: bool = False) -> None:
        """Put ``rows``' documents into ``current`` as part ``part``; with ``repair``, only those whose
        ``current`` rows are neither this run's nor a later run's (a part whose ``current`` commit is missing),
        and a commit either way (the fence)."""
        from deltalake import write_deltalake

        def replace(table) -> None:
            if self.applied(table, part) and not repair:
                return
            wanted = self._missing(table, rows) if repair else rows
            if wanted.num_rows:
                documents = pc.unique(wanted.column("document")).to_pylist()
                predicate = f"document IN ({', '.join(sql_string(document) for document in documents)})"
                log.info(
                    "run %s: %d row(s) of %d document(s) into current", self.run_id, wanted.num_rows, len(documents)
                )
                options = {"mode": "overwrite", "predicate": predicate}
            else:
                options = {"mode": "append"}
            data = wanted if "run_date" in wanted.schema.names else self.with_run_date(wanted)
            write_deltalake(table, data, commit_properties=self.properties(part), **options)

        self.tables.retry_commit(CURRENT, replace)

    def replace_items(self, rows: pa.Table, part: int, repair: bool = False) -> None:
        """Put the records of ``rows``' documents into ``items`` as part ``part``, in place of the documents'
        earlier ones; with ``repair``, of those documents whose ``current`` rows are this run's (its commit
        may have missed ``items`` after ``current``), and a commit either way (the fence)."""
        from deltalake import write_deltalake

        def replace(table) -> None:
            if self.applied(table, part) and not repair:
                return
            wanted = self._ours_in_current(rows) if repair else rows
            documents = pc.unique(wanted.column("document")).to_pylist()
            if documents:
                predicate = f"document IN ({', '.join(sql_string(document) for document in documents)})"
                options = {"mode": "overwrite", "predicate": predicate}
            else:
                options = {"mode": "append"}
            write_deltalake(table, document_items(wanted), commit_properties=self.properties(part), **options)

        self.tables.retry_commit(ITEMS, replace)

    def _ours_in_current(self, rows: pa.Table) -> pa.Table:
        """Of ``rows``, those of documents whose rows in ``current`` are this run's."""
        if not rows.num_rows:
            return rows
        there = self.tables.read(
            CURRENT,
            columns=["document", "run_id"],
            filter=ds.field("document").isin(pc.unique(rows.column("document"))),
        )
        ours = pc.unique(there.filter(pc.equal(there.column("run_id"), self.run_id)).column("document"))
        return rows.filter(pc.is_in(rows.column("document"), value_set=ours))

    def _missing(self, table, rows: pa.Table) -> pa.Table:
        """Of ``rows`` (this run's committed rows), those of documents whose rows in this snapshot of ``current``
        are another, earlier run's, or absent."""
        if not rows.num_rows:
            return rows
        documents = pc.unique(rows.column("document"))
        there = self.tables.files_of(table, CURRENT).to_table(
            columns=["document", "run_id"], filter=ds.field("document").isin(documents)
        )
        runs = self.tables.read(RUNS, columns=["run_id", "started_at"]).to_pylist()
        ours = datetime.fromisoformat(self.started_at)
        newer = {run["run_id"] for run in runs if run["run_id"] != self.run_id and run["started_at"] > ours}
        # Keep this run's rows, and those of runs started after it (they processed the document later).
        keep = pc.or_(
            pc.equal(there.column("run_id"), self.run_id),
            pc.is_in(there.column("run_id"), pa.array(sorted(newer), pa.string())),
        )
        return without(rows, pc.unique(there.filter(keep).column("document")).to_pylist())


def take_over_abandoned(tables: OutputTables, but: str | None = None, now: datetime | None = None) -> list[str]:
    """Mark ``abandoned`` each ``running`` run (but ``but``) whose lease has passed, under a new attempt
    number, and bring ``current`` up to date with what it committed. Returns the run ids taken over."""
    now = now or datetime.now(UTC)
    rows = tables.read(RUNS, filter=ds.field("state") == "running").to_pylist()
    taken = []
    for row in rows:
        if row["run_id"] == but or not lease_expired(row, now):
            continue
        attempt = _abandon(tables, row["run_id"], now)
        if attempt is None:
            continue  # it came back to life, or another run took it over first
        fence = RunFence(tables, row["run_id"], row["run_date"], attempt, row["started_at"].isoformat())
        try:
            fence.adopt()
        except RunExistsError:
            continue  # a later attempt of it (a rerun of its id) has started meanwhile: it repairs
        log.warning(
            "run %s was abandoned (its driver stopped renewing its lease at %s); current is repaired",
            row["run_id"],
            row.get("lease_expires_at"),
        )
        taken.append(row["run_id"])
    return taken


ENDED = ("failed", "abandoned")  # the states a run can end in with a part's `current` or `items` commit missing


def repair_ended(tables: OutputTables, but: str | None = None) -> list[str]:
    """Bring ``current`` and ``items`` up to date for each run (but ``but``) that ended ``failed`` or
    ``abandoned`` with a part missing from them: its last commit in ``answers`` is newer than its last in
    ``current`` or ``items`` (a driver that failed, or died, between a part's commits; an abandoning run that
    died before its repair). Returns the run ids repaired.

    A ``committed`` run never lags (its row is written after its last part's three commits). A ``running`` run
    is not touched here: while its lease lives its own writer is between a part's commits at any moment, and
    only fencing it out could repair it, which would stop a live run (``take_over_abandoned`` does that once
    its lease has passed). A run that ended has no writer left, so its repair fences nobody out: it commits
    under the run's last attempt number, and a rerun of its id that starts meanwhile (a later attempt) wins."""
    rows = tables.read(RUNS, filter=ds.field("state").isin(ENDED)).to_pylist()
    if not rows:
        return []
    versions = {name: tables.open(name) for name in (ANSWERS, CURRENT, ITEMS)}
    repaired = []
    for row in rows:
        run = app_id(row["run_id"])
        written = versions[ANSWERS].transaction_version(run) or 0
        if row["run_id"] == but or not written:
            continue
        if min(versions[name].transaction_version(run) or 0 for name in (CURRENT, ITEMS)) >= written:
            continue
        fence = RunFence(tables, row["run_id"], row["run_date"], row["attempt"], row["started_at"].isoformat())
        try:
            fence.adopt()
        except RunExistsError:
            continue  # a rerun of its id has started meanwhile: it repairs
        except (TableError, OSError) as error:  # an old run's repair never stops this one: the next run tries again
            log.warning("run %s lags in current or items and could not be repaired now: %s", row["run_id"], error)
            continue
        log.warning(
            "run %s (%s) had committed a part to answers that current or items lacked; they are repaired",
            row["run_id"],
            row["state"],
        )
        repaired.append(row["run_id"])
    return repaired


def _abandon(tables: OutputTables, run_id: str, now: datetime) -> int | None:
    """Claim the dead run's next attempt number with state ``abandoned``; None if it is no longer a
    ``running`` row past its lease in the snapshot the claim commits on."""

    def claim(table) -> int | None:
        earlier = run_rows(tables, table, run_id)
        if not earlier or earlier[0]["state"] != "running" or not lease_expired(earlier[0], now):
            return None
        row = earlier[0]
        attempt = max((table.transaction_version(app_id(run_id)) or 0), row["attempt"]) + 1
        seen = row.get("lease_expires_at") or row["started_at"]
        error = (
            f"abandoned: its driver stopped without a word (lease ran out at {seen.isoformat()}); current holds "
            f"the documents it committed. Run it again with --run-id {run_id} to finish it"
        )
        merge_run(
            table, {**row, "state": "abandoned", "attempt": attempt, "error": error, "lease_expires_at": None}, attempt
        )
        return attempt

    return tables.retry_commit(RUNS, claim)
