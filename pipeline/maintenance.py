"""`docqa optimize`: compacting an output's tables and vacuuming the files no recent version needs, never
while a run may be writing to it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pyarrow.dataset as ds

from pipeline.config import StorageConfig
from pipeline.storage import check_writable_output, is_s3
from pipeline.tables import (
    CURRENT,
    RUNS,
    TABLES,
    TABLES_OF_EVERY_OUTPUT,
    OutputTables,
    TableError,
    describe_delta_error,
    lease_end,
    lease_expired,
)

MIN_RETAIN_HOURS = 1  # vacuum keeps at least this much unless forced: a writer's new files wait minutes, not hours


class VacuumRefused(TableError):
    """`docqa optimize` would put a running writer's files at risk; the message says why and what to do."""


def live_runs(tables: OutputTables, now: datetime | None = None) -> list[dict[str, Any]]:
    """The ``runs`` rows of runs whose driver holds a lease now (writing, or about to)."""
    now = now or datetime.now(UTC)
    rows = tables.read(RUNS, filter=ds.field("state") == "running").to_pylist()
    return [row for row in rows if not lease_expired(row, now)]


def _refuse_while_writing(tables: OutputTables) -> None:
    """Raise VacuumRefused, naming them, when runs hold a lease on the output."""
    writing = live_runs(tables)
    if writing:
        named = ", ".join(f"{row['run_id']} (lease until {lease_end(row):%H:%M:%S} UTC)" for row in writing)
        raise VacuumRefused(
            f"a run is writing to {tables.output}: {named}. Vacuum could delete files it is about to commit; run "
            "`docqa optimize` again once it has ended (`docqa runs` shows its state)"
        )


def optimize_output(
    output: str, storage: StorageConfig | None, retain_hours: int, force: bool = False
) -> dict[str, dict[str, int]]:
    """Compact each table's small files (``current`` is also clustered by document, Z-order, so that a
    commit's ``document IN (...)`` replace reads few files), then vacuum the files no version of the last
    ``retain_hours`` needs. Readers see the same rows before and after; time travel reaches back
    ``retain_hours``.

    Vacuum deletes files no version in the window references, including files a writer has written and not
    yet committed: so it refuses a window under MIN_RETAIN_HOURS (unless ``force``), and refuses to run at
    all while a run holds a lease on the output (``runs``: ``running`` and its lease not passed). That is
    checked at the start and again right before each table's vacuum, so a run that started while the tables
    were compacted stops the vacuum too. What is left is the moment between that last check and the vacuum's
    listing of the table: a run that claims its lease then can lose a file it wrote in that moment only
    under a forced window shorter than the file's age (a window of MIN_RETAIN_HOURS or more keeps it)."""
    from deltalake.exceptions import DeltaError

    if retain_hours < MIN_RETAIN_HOURS and not force:
        raise VacuumRefused(
            f"--retain-hours {retain_hours} is under {MIN_RETAIN_HOURS}: vacuum could delete the files a running "
            "writer has written but not committed yet. Use --force only when no run can be writing to this output"
        )
    tables = OutputTables(output, storage or StorageConfig())
    if is_s3(output):
        check_writable_output(output, tables.storage)
    for name in TABLES_OF_EVERY_OUTPUT:
        if tables.open(name) is None:
            raise TableError(f"no docqa output under {output} (no Delta table at {tables.uri(name)})")
    _refuse_while_writing(tables)
    report = {}
    for name in TABLES:
        table = tables.open(name)
        if table is None:  # items or reviews, of an output no run has written to since they came
            continue
        before = len(table.file_uris())

        def compact(table, name: str = name) -> dict[str, Any]:
            return table.optimize.z_order(["document"]) if name == CURRENT else table.optimize.compact()

        metrics = tables.retry_commit(name, compact)
        _refuse_while_writing(tables)  # again: a run may have started while the tables were compacted
        table = tables.open(name)
        try:
            vacuumed = table.vacuum(retention_hours=retain_hours, dry_run=False, enforce_retention_duration=False)
        except (DeltaError, OSError) as error:
            raise TableError(describe_delta_error(error, f"vacuum of {tables.uri(name)} failed")) from None
        report[name] = {
            "files_before": before,
            "files_after": len(table.file_uris()),
            "files_removed": int(metrics.get("numFilesRemoved", 0)),
            "vacuumed": len(vacuumed),
        }
    return report
