"""The output tables: Delta Lake tables under the output location, written and read with ``deltalake``
(delta-rs), so that any engine (DuckDB, Polars, Spark, Athena, Trino) reads them correctly without docqa.

Layout under the output location (local folder or s3:// prefix)::

    OUTPUT/answers/   every row ever committed (ANSWER_SCHEMA), partitioned by run_date, full history
    OUTPUT/current/   per document, the rows of the latest run that processed it (same schema)
    OUTPUT/items/     per document, the records of its list and object answers in `current`, one row per
                      field (ITEM_SCHEMA), numbered across the document's pages
    OUTPUT/reviews/   append-only: what people decided about answers (docqa review, Label Studio imports)
    OUTPUT/runs/      one row per run (RUN_SCHEMA): its state (running, committed, failed) and record

Delta's log gives what a folder of Parquet files could not: a reader sees only committed files, commits
are atomic (put-if-absent on local disks and on S3 through conditional writes), concurrent writers are
serialised by optimistic concurrency, and old versions stay readable (time travel) until vacuumed.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.dataset as ds
from pyarrow import fs as pafs

from pipeline.config import StorageConfig
from pipeline.records import ITEM_SCHEMA, OUTPUT_SCHEMA, REVIEW_SCHEMA
from pipeline.storage import endpoint_of, filesystem_for, is_s3

ANSWERS = "answers"
CURRENT = "current"
RUNS = "runs"
ITEMS = "items"
REVIEWS = "reviews"
TABLES_OF_EVERY_OUTPUT = (ANSWERS, CURRENT, RUNS)
# items (line items) and reviews (docqa review) came later: an older output gains them on its next run.
TABLES = (*TABLES_OF_EVERY_OUTPUT, ITEMS, REVIEWS)
ANSWER_SCHEMA = OUTPUT_SCHEMA.append(pa.field("run_date", pa.date32(), nullable=False))
RUN_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("run_date", pa.date32(), nullable=False),
        pa.field("state", pa.string(), nullable=False),  # running, committed, failed, abandoned
        pa.field("attempt", pa.int32(), nullable=False),  # 1, then 2... for each start of the same run id
        pa.field("started_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("finished_at", pa.timestamp("us", tz="UTC")),
        pa.field("duration_s", pa.float64()),
        pa.field("input", pa.string()),
        pa.field("model_id", pa.string()),
        pa.field("config_fingerprint", pa.string()),
        pa.field("documents", pa.int64()),
        pa.field("failed_documents", pa.int64()),
        pa.field("pages", pa.int64()),
        pa.field("failed_pages", pa.int64()),
        pa.field("answers", pa.int64()),
        pa.field("rows", pa.int64()),
        pa.field("commits", pa.int32()),  # Delta commits (parts) of this run in `answers`
        pa.field("degraded", pa.bool_()),  # committed, but over limits.max_failed_page_share (exit code 3)
        pa.field("error", pa.string()),  # why a failed run failed
        pa.field("record", pa.string()),  # the whole run record, JSON (config, versions, counts, isolation)
        # While the run lives its driver moves this forward (pipeline/writing.py, the heartbeat); a `running` run
        # past it is abandoned by the next run on the output.
        pa.field("lease_expires_at", pa.timestamp("us", tz="UTC")),
    ]
)
SCHEMAS = {ANSWERS: ANSWER_SCHEMA, CURRENT: ANSWER_SCHEMA, RUNS: RUN_SCHEMA, ITEMS: ITEM_SCHEMA, REVIEWS: REVIEW_SCHEMA}
PARTITIONS = {ANSWERS: ["run_date"], CURRENT: None, RUNS: None, ITEMS: None, REVIEWS: None}
COMMIT_ATTEMPTS = 20
SALT_FILE = "_docqa/digest_salt"
SALT_BYTES = 16
DEFAULT_LEASE_S = 300.0  # a `running` row without a lease (written by an older docqa): this long after its start
T = TypeVar("T")
log = logging.getLogger("docqa")


class TableError(RuntimeError):
    """The output tables cannot be read or written; the message says why and what to do."""


def table_uri(output: str, name: str) -> str:
    """Where table ``name`` lives: an s3:// URI, or an absolute local path."""
    if is_s3(output):
        return f"{output.rstrip('/')}/{name}"
    return str(Path(output).expanduser().resolve() / name)


def storage_options(output: str, storage: StorageConfig) -> dict[str, str] | None:
    """delta-rs's object store settings for ``output``, from the same StorageConfig as boto3 and pyarrow.
    Credentials come from the standard AWS environment variables (delta-rs reads them itself)."""
    if not is_s3(output):
        return None
    options = {
        "timeout": f"{storage.read_timeout_s:g}s",
        "connect_timeout": f"{storage.connect_timeout_s:g}s",
    }
    region = storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["AWS_REGION"] = region
    endpoint = endpoint_of(storage)
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        if urlparse(endpoint).scheme == "http":
            options["AWS_ALLOW_HTTP"] = "true"
    return options


def describe_delta_error(error: Exception, what: str) -> str:
    """A readable reason for a failed Delta operation, naming S3's conditional writes where they matter."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "precondition" in text.lower() or "conditional" in text.lower() or "not implemented" in text.lower():
        return (
            f"{what}: {text}. docqa's Delta commits need the store's conditional writes (PUT with If-None-Match):"
            " AWS S3, MinIO, Cloudflare R2 and moto support them; a store without them cannot take commits safely"
        )
    return f"{what}: {text}"


@dataclass(frozen=True)
class OutputTables:
    """The three tables of one output location."""

    output: str
    storage: StorageConfig

    def uri(self, name: str) -> str:
        return table_uri(self.output, name)

    @property
    def options(self) -> dict[str, str] | None:
        return storage_options(self.output, self.storage)

    def open(self, name: str, version: int | None = None):
        """The table at its latest version, or at ``version``; None when the table does not exist yet."""
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            return DeltaTable(self.uri(name), version=version, storage_options=self.options)
        except TableNotFoundError:
            return None
        except Exception as error:  # noqa: BLE001 - delta-rs raises plain exceptions for store failures
            raise TableError(describe_delta_error(error, f"cannot open {self.uri(name)}")) from None

    def create(self) -> None:
        """Create the tables that do not exist yet, and add the columns a newer docqa writes to those that do
        (their older rows read them as null). Two writers creating the same table at once: one commit wins,
        the other finds the table there."""
        from deltalake import DeltaTable
        from deltalake.exceptions import CommitFailedError

        for name in TABLES:
            self._add_new_columns(name)
            try:
                DeltaTable.create(
                    self.uri(name),
                    SCHEMAS[name],
                    mode="ignore",
                    partition_by=PARTITIONS[name],
                    name=f"docqa_{name}",
                    storage_options=self.options,
                )
            except CommitFailedError:
                if self.open(name) is None:
                    raise
            except Exception as error:  # noqa: BLE001 - delta-rs raises plain exceptions for store failures
                raise TableError(describe_delta_error(error, f"cannot create {self.uri(name)}")) from None

    def _add_new_columns(self, name: str) -> None:
        """Schema evolution of a table written by an older docqa: the columns it lacks, added (nullable)."""
        from deltalake import Schema

        def add(table) -> None:
            present = set(table.schema().to_arrow().names)
            missing = [field for field in SCHEMAS[name] if field.name not in present]
            if missing:
                log.info("adding the columns %s to %s", [field.name for field in missing], self.uri(name))
                table.alter.add_columns(Schema.from_arrow(pa.schema(missing)).fields)

        if self.open(name) is not None:
            self.retry_commit(name, add)

    def digest_salt(self) -> bytes:
        """The output's own random salt for the digests of settings (pipeline/fingerprints.py), made by the
        first run that asks (written if absent: two runs at once agree on one) and kept beside the tables."""
        _, root = filesystem_for(self.output, self.storage)
        path = f"{root.rstrip('/')}/{SALT_FILE}"
        if not is_s3(self.output):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            written = Path(f"{path}.{secrets.token_hex(4)}")
            written.write_text(secrets.token_hex(SALT_BYTES))
            try:
                os.link(written, path)  # whole or not at all: a run reading it never sees it half written
            except FileExistsError:
                pass
            finally:
                written.unlink()
            return bytes.fromhex(Path(path).read_text().strip())
        from botocore.exceptions import ClientError

        from pipeline.storage import s3_client, split_s3

        bucket, key = split_s3(f"{self.output.rstrip('/')}/{SALT_FILE}")
        client = s3_client(self.storage)
        try:
            client.put_object(Bucket=bucket, Key=key, Body=secrets.token_hex(SALT_BYTES).encode(), IfNoneMatch="*")
        except ClientError as error:
            if error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") not in (409, 412):
                raise TableError(describe_delta_error(error, f"cannot write {self.output}/{SALT_FILE}")) from None
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            return bytes.fromhex(body.read().decode().strip())
        finally:
            body.close()

    def dataset(self, name: str, as_of: datetime | None = None, asked: str | None = None) -> ds.Dataset:
        """A pyarrow dataset of the table's committed files, at its latest version or as of ``as_of``;
        empty when the table does not exist (yet, or at ``as_of``). A version of the past whose files were
        vacuumed raises TableError (``asked``: how the user named it)."""
        table = self.open(name)
        if table is None or (as_of is not None and as_of < min(commit_times(table).values())):
            return ds.dataset(SCHEMAS[name].empty_table())
        if as_of is not None:
            table.load_as_version(as_of)
            self.check_readable(name, table, asked or f"the version as of {as_of.isoformat()}")
        return self.files_of(table, name)

    def check_readable(self, name: str, table, asked: str) -> None:
        """Raise TableError when files of this loaded version of table ``name`` are gone (vacuumed by
        ``docqa optimize``), naming when that happened and the oldest version still whole. ``asked``: what
        the user asked for (``version 3``, ``as of 2026-11-24T06:00:00+00:00``)."""
        if self._all_present(name, table):
            return
        latest = self.open(name)
        history = latest.history()
        asked_at = max(commit_times(table).values()) if len(table.history(1)) else None
        vacuums = sorted(
            datetime.fromtimestamp(entry["timestamp"] / 1000, UTC)
            for entry in history
            if str(entry.get("operation", "")).startswith("VACUUM")
        )
        when = next((moment for moment in vacuums if asked_at is None or moment >= asked_at), None)
        removed = f"on {when:%Y-%m-%d %H:%M} UTC" if when else "(no vacuum is recorded in its history)"
        low, high = table.version() + 1, latest.version()  # the oldest version whose files are all present
        while low < high:
            middle = (low + high) // 2
            if self._all_present(name, self.open(name, middle)):
                high = middle
            else:
                low = middle + 1
        oldest = f"{low} ({commit_times(latest)[low]:%Y-%m-%d %H:%M:%S} UTC)"
        raise TableError(
            f"{asked} of `{name}` was removed by `docqa optimize` {removed}: its files were vacuumed. "
            f"The oldest readable version of `{name}` is {oldest}"
        )

    def _all_present(self, name: str, table) -> bool:
        """Whether every file this version of the table references is still in storage (one listing)."""
        filesystem, root = filesystem_for(self.uri(name), self.storage)
        listed = filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        present = {info.path[len(root) :].lstrip("/") for info in listed}
        return all(self._path_in_table(name, uri) in present for uri in table.file_uris())

    def _path_in_table(self, name: str, uri: str) -> str:
        """A file of table ``name`` (an absolute URI from delta-rs) as a path under the table's root."""
        return uri.removeprefix("file://").removeprefix(self.uri(name).rstrip("/") + "/")

    def files_of(self, table, name: str) -> ds.Dataset:
        """The files of ``table`` (a loaded version of table ``name``) as a pyarrow dataset, read through
        pyarrow's own local or S3 filesystem. delta-rs's default is a Python file handler that Arrow's I/O
        threads call into, which aborts the interpreter at exit about one time in three ("terminate called
        without an active exception"; delta-rs #2184): never for a read of ours."""
        filesystem, root = filesystem_for(self.uri(name), self.storage)
        return table.to_pyarrow_dataset(schema=SCHEMAS[name], filesystem=pafs.SubTreeFileSystem(root, filesystem))

    def pruned_files_of(self, table, name: str, pruning: list[tuple[str, str, Any]]) -> ds.Dataset:
        """Of ``table`` (a loaded version of table ``name``, without partition columns), only the files whose
        statistics may hold rows matching ``pruning`` (delta-rs tuple filters, decided from the log), as a
        plain Parquet dataset (delta-rs's own gives each file its statistics as an expression: string_view
        literals, for files it rewrote, that Arrow cannot compare with a string)."""
        filesystem, root = filesystem_for(self.uri(name), self.storage)
        paths = [self._path_in_table(name, uri) for uri in table.file_uris(file_pruning_predicate=pruning)]
        return ds.dataset(
            paths, schema=SCHEMAS[name], format="parquet", filesystem=pafs.SubTreeFileSystem(root, filesystem)
        )

    def read(self, name: str, columns: list[str] | None = None, filter: ds.Expression | None = None) -> pa.Table:
        """The latest version's rows of table ``name`` (only ``columns``, only rows matching ``filter``)."""
        return self.dataset(name).to_table(columns=columns, filter=filter)

    def retry_commit(self, name: str, operation: Callable[[Any], T]) -> T:
        """Run ``operation(table)`` on the latest version of table ``name``; when a concurrent writer's
        commit conflicts with it, reload the table and run it again (operations here are idempotent: the
        caller checks its application transaction first)."""
        from deltalake.exceptions import CommitFailedError, DeltaError

        attempt = 1
        while True:
            table = self.open(name)
            if table is None:
                raise TableError(f"{self.uri(name)} does not exist")
            try:
                return operation(table)
            except CommitFailedError as error:
                if attempt == COMMIT_ATTEMPTS:
                    raise TableError(describe_delta_error(error, f"commit to {self.uri(name)} failed")) from None
                log.info("commit to %s met a concurrent commit (%s); retrying", name, str(error).splitlines()[0])
                time.sleep(min(0.05 * 2**attempt, 2.0))
                attempt += 1
            except (DeltaError, OSError) as error:
                raise TableError(describe_delta_error(error, f"commit to {self.uri(name)} failed")) from None


def commit_times(table) -> dict[int, datetime]:
    """Each version's commit time, from the history of the table at its latest version (delta-rs 1.6
    misnumbers the history of a table loaded at an older one)."""
    return {entry["version"]: datetime.fromtimestamp(entry["timestamp"] / 1000, UTC) for entry in table.history()}


def sql_string(value: str) -> str:
    """A string literal for a delta-rs (DataFusion) predicate."""
    return "'" + value.replace("'", "''") + "'"


def committed_runs(output: str, storage: StorageConfig | None = None) -> list[dict[str, Any]]:
    """The records of the committed runs under ``output``, oldest first, each with its ``run_date`` and
    ``attempt`` (``runs`` rows in state ``committed``)."""
    import json

    tables = OutputTables(output, storage or StorageConfig())
    rows = tables.read(RUNS, columns=["record", "run_date", "attempt"], filter=ds.field("state") == "committed")
    records = [
        {**json.loads(row["record"]), "run_date": row["run_date"].isoformat(), "attempt": row["attempt"]}
        for row in rows.to_pylist()
    ]
    return sorted(records, key=lambda record: (record["started_at"], record["run_id"]))


def read_answers(
    output: str, run_id: str | None = None, storage: StorageConfig | None = None, columns: list[str] | None = None
) -> pa.Table:
    """Rows of ``answers`` (every committed row; only those of ``run_id`` when given)."""
    tables = OutputTables(output, storage or StorageConfig())
    return tables.read(ANSWERS, columns, None if run_id is None else ds.field("run_id") == run_id)


def read_current(output: str, storage: StorageConfig | None = None, columns: list[str] | None = None) -> pa.Table:
    """Rows of ``current``: per document, the rows of the latest run that processed it."""
    return OutputTables(output, storage or StorageConfig()).read(CURRENT, columns)


def lease_end(row: dict[str, Any]) -> datetime:
    """When a ``running`` row's lease ends (a row without a lease, written by an older docqa, counts
    DEFAULT_LEASE_S from its start)."""
    return row.get("lease_expires_at") or row["started_at"] + timedelta(seconds=DEFAULT_LEASE_S)


def lease_expired(row: dict[str, Any], now: datetime) -> bool:
    """Whether a ``running`` row's driver is gone: its lease has passed."""
    return lease_end(row) < now
