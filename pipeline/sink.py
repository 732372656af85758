"""The sink, on the driver: it iterates the plan's output batches (``iter_batches``), writes a run's rows to
Parquet and commits the run.

Layout under the output location (local folder or s3:// prefix)::

    OUTPUT/runs/YYYY-MM-DD/RUN_ID/part-00000.parquet ...   the rows (OUTPUT_SCHEMA)
    OUTPUT/runs/YYYY-MM-DD/RUN_ID/_run.json                 the run record, written last: the commit

A run is visible to readers only once its ``_run.json`` exists (a single object write, atomic on local
disks and on S3). A run that dies before that leaves files no reader looks at; a committed run is never
overwritten.

Part files hold complete documents only (every row of a document, per its ``document_rows``) and appear
atomically (written under a temporary name, then moved), so a run with the same id that starts again
after a crash can adopt them as they are and skip their documents.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from pipeline.config import StorageConfig
from pipeline.rows import OUTPUT_SCHEMA
from pipeline.storage import filesystem_for

RUN_RECORD = "_run.json"
PART_PREFIX = "part-"
TEMPORARY_SUFFIX = ".tmp"
log = logging.getLogger("docqa")


class RunExistsError(RuntimeError):
    """A committed run with this id already exists; it is never overwritten."""


def run_directory(root: str, run_date: str, run_id: str) -> str:
    return f"{root.rstrip('/')}/runs/{run_date}/{run_id}"


class RunWriter:
    """Buffers result batches until their documents are complete, writes Parquet files of about
    ``rows_per_file`` rows as they fill, then commits the run record.

    With ``resume``, the complete part files an earlier attempt of this run id left behind are kept
    (``recovered``) and numbering continues after them; otherwise they are removed."""

    def __init__(
        self,
        output: str,
        run_id: str,
        run_date: str,
        storage: StorageConfig,
        rows_per_file: int = 50_000,
        resume: bool = False,
    ) -> None:
        self.filesystem, root = filesystem_for(output, storage)
        self.directory = run_directory(root, run_date, run_id)
        self.rows_per_file = rows_per_file
        self.committed = committed_runs(output, storage)  # the runs already committed under output
        for record in self.committed:
            if record["run_id"] == run_id:
                raise RunExistsError(f"run {run_id!r} is already committed in {record['directory']}; pick another id")
        self.files: list[str] = []
        self.recovered = OUTPUT_SCHEMA.empty_table()
        existing = self.filesystem.get_file_info(pafs.FileSelector(self.directory, allow_not_found=True))
        for info in existing:
            if resume and info.base_name.startswith(PART_PREFIX) and not info.base_name.endswith(TEMPORARY_SUFFIX):
                self.files.append(info.base_name)
            else:
                self.filesystem.delete_file(info.path)
        self.files.sort()
        if self.files:
            self.recovered = pa.concat_tables(
                pq.read_table(f"{self.directory}/{name}", filesystem=self.filesystem, schema=OUTPUT_SCHEMA)
                for name in self.files
            )
        self.filesystem.create_dir(self.directory, recursive=True)
        self._next_part = 1 + max((int(name[len(PART_PREFIX) :].split(".")[0]) for name in self.files), default=-1)
        self._waiting: pa.Table | None = None  # rows of documents that are not complete yet
        self._pending: list[pa.Table] = []  # rows of complete documents, not yet written
        self._pending_rows = 0

    def write(self, table: pa.Table) -> None:
        table = table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
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
        if self._pending_rows >= self.rows_per_file:
            self._flush()

    def _flush(self) -> None:
        if not self._pending_rows:
            return
        name = f"{PART_PREFIX}{self._next_part:05d}.parquet"
        temporary = f"{self.directory}/{name}{TEMPORARY_SUFFIX}"
        pq.write_table(pa.concat_tables(self._pending), temporary, filesystem=self.filesystem)
        self.filesystem.move(temporary, f"{self.directory}/{name}")
        self.files.append(name)
        self._next_part += 1
        self._pending, self._pending_rows = [], 0

    def commit(self, record: dict[str, Any]) -> str:
        """Flush, then write the run record that makes the run visible. Returns the record's path."""
        if self._waiting is not None:
            # Should not happen; if it does, keep the rows (the index will not count these documents as done).
            incomplete = sorted(set(self._waiting.column("document").to_pylist()))
            log.warning(
                "%d document(s) arrived incomplete and will be retried next run: %s", len(incomplete), incomplete[:5]
            )
            self._pending.append(self._waiting)
            self._pending_rows += self._waiting.num_rows
            self._waiting = None
        self._flush()
        path = f"{self.directory}/{RUN_RECORD}"
        payload = json.dumps({**record, "files": self.files}, indent=2, sort_keys=True).encode()
        with self.filesystem.open_output_stream(path) as stream:
            stream.write(payload)
        return path


def committed_runs(output: str, storage: StorageConfig | None = None) -> list[dict[str, Any]]:
    """Run records of the committed runs under ``output``, oldest first, each with its ``directory``."""
    filesystem, root = filesystem_for(output, storage or StorageConfig())
    selector = pafs.FileSelector(f"{root.rstrip('/')}/runs", recursive=True, allow_not_found=True)
    records = []
    for info in filesystem.get_file_info(selector):
        if info.base_name == RUN_RECORD:
            with filesystem.open_input_stream(info.path) as stream:
                record = json.loads(stream.read())
            records.append({**record, "directory": info.path.rsplit("/", 1)[0]})
    return sorted(records, key=lambda record: (record["started_at"], record["run_id"]))


def read_committed(
    output: str,
    run_id: str | None = None,
    storage: StorageConfig | None = None,
    columns: list[str] | None = None,
    records: list[dict[str, Any]] | None = None,
) -> pa.Table:
    """Rows of the committed runs (or of one), never of an uncommitted run. ``records``: the runs'
    records when the caller has just listed them (``committed_runs``), so they are not listed again."""
    filesystem, _ = filesystem_for(output, storage or StorageConfig())
    schema = OUTPUT_SCHEMA if columns is None else pa.schema([OUTPUT_SCHEMA.field(name) for name in columns])
    paths = [
        f"{record['directory']}/{name}"
        for record in (committed_runs(output, storage) if records is None else records)
        if run_id is None or record["run_id"] == run_id
        for name in record["files"]
    ]
    if not paths:
        return schema.empty_table()
    return pa.concat_tables(
        pq.read_table(path, filesystem=filesystem, schema=OUTPUT_SCHEMA, columns=schema.names) for path in paths
    )
