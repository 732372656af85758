"""Stage 6: write a run's rows to Parquet and commit the run.

Layout under the output location::

    OUTPUT/runs/YYYY-MM-DD/RUN_ID/part-00000.parquet ...   the rows (OUTPUT_SCHEMA)
    OUTPUT/runs/YYYY-MM-DD/RUN_ID/_run.json                 the run record, written last: the commit

A run is visible to readers only once its ``_run.json`` exists (a single object write, atomic on local
disks and on S3). A run that dies before that leaves files no reader looks at; a committed run is never
overwritten.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from pipeline.config import StorageConfig
from pipeline.rows import OUTPUT_SCHEMA
from pipeline.storage import filesystem_for

RUN_RECORD = "_run.json"


class RunExistsError(RuntimeError):
    """A committed run with this id already exists; it is never overwritten."""


def run_directory(root: str, run_date: str, run_id: str) -> str:
    return f"{root.rstrip('/')}/runs/{run_date}/{run_id}"


class RunWriter:
    """Buffers result batches into Parquet files of ``rows_per_file`` rows, then commits the run record."""

    def __init__(
        self, output: str, run_id: str, run_date: str, storage: StorageConfig, rows_per_file: int = 50_000
    ) -> None:
        self.filesystem, root = filesystem_for(output, storage)
        self.directory = run_directory(root, run_date, run_id)
        self.rows_per_file = rows_per_file
        self.files: list[str] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        for record in committed_runs(output, storage):
            if record["run_id"] == run_id:
                raise RunExistsError(f"run {run_id!r} is already committed in {record['directory']}; pick another id")
        # Files left by an earlier attempt of this run id that never committed: nobody reads them.
        if self.filesystem.get_file_info(self.directory).type != pafs.FileType.NotFound:
            self.filesystem.delete_dir_contents(self.directory)
        self.filesystem.create_dir(self.directory, recursive=True)

    def write(self, table: pa.Table) -> None:
        self._pending.append(table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA))
        self._pending_rows += table.num_rows
        if self._pending_rows >= self.rows_per_file:
            self._flush()

    def _flush(self) -> None:
        if not self._pending_rows:
            return
        name = f"part-{len(self.files):05d}.parquet"
        pq.write_table(pa.concat_tables(self._pending), f"{self.directory}/{name}", filesystem=self.filesystem)
        self.files.append(name)
        self._pending, self._pending_rows = [], 0

    def commit(self, record: dict[str, Any]) -> str:
        """Flush, then write the run record that makes the run visible. Returns the record's path."""
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


def read_committed(output: str, run_id: str | None = None, storage: StorageConfig | None = None) -> pa.Table:
    """All rows of the committed runs (or of one), never of an uncommitted run."""
    filesystem, _ = filesystem_for(output, storage or StorageConfig())
    paths = [
        f"{record['directory']}/{name}"
        for record in committed_runs(output, storage)
        if run_id is None or record["run_id"] == run_id
        for name in record["files"]
    ]
    if not paths:
        return OUTPUT_SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(path, filesystem=filesystem, schema=OUTPUT_SCHEMA) for path in paths)
