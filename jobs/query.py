"""Reading answers back: SQL over the committed runs, and the four questions users ask most.

DuckDB runs in-process over a pyarrow dataset of the committed runs' Parquet files, so local folders and
s3:// prefixes read the same way (pyarrow's S3 client; DuckDB's httpfs extension is never needed). Only
committed runs are visible. Three relations can be queried:

- ``answers``: the current answer of every (document, page, question): for each document, the rows of its
  latest version (the ``source_version`` of the latest run that processed it), and of those the one from
  the latest run per page and question. With a run id: that run's rows as they are.
- ``all_rows``: every row of every committed run (or of the selected run).
- ``runs``: one row per committed run.

Results stream as Arrow record batches (``AnswerStore.reader``); the module functions return whole
pyarrow Tables for notebooks (``.to_pandas()`` for a DataFrame).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds

from pipeline.config import StorageConfig
from pipeline.rows import OUTPUT_SCHEMA, Status
from pipeline.sink import committed_runs
from pipeline.storage import filesystem_for

STREAM_BATCH_ROWS = 10_000
RUNS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("run_date", pa.string()),
        ("started_at", pa.string()),
        ("duration_s", pa.float64()),
        ("documents", pa.int64()),
        ("failed_documents", pa.int64()),
        ("pages", pa.int64()),
        ("failed_pages", pa.int64()),
        ("answers", pa.int64()),
        ("rows", pa.int64()),
        ("model_id", pa.string()),
        ("input", pa.string()),
        ("run_order", pa.int64()),
    ]
)
QUERYABLE_COLUMNS = {"answers": OUTPUT_SCHEMA.names, "all_rows": OUTPUT_SCHEMA.names, "runs": RUNS_SCHEMA.names}
# The current answers: rows of each document's latest version, then the latest run per page and question.
CURRENT_ANSWERS_SQL = """
SELECT * EXCLUDE (run_order, latest_version) FROM (
    SELECT r.*, o.run_order,
        last_value(coalesce(r.source_version, '')) OVER (
            PARTITION BY r.document ORDER BY o.run_order
            ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING
        ) AS latest_version
    FROM all_rows AS r JOIN runs AS o USING (run_id)
)
WHERE coalesce(source_version, '') = latest_version
QUALIFY row_number() OVER (PARTITION BY document, page_number, question_id ORDER BY run_order DESC) = 1
"""


class QueryError(ValueError):
    """A query the engine refused, or a run or document that does not exist; the message says what to do."""


def _run_row(order: int, record: dict[str, Any]) -> dict[str, Any]:
    counts = record.get("counts", {})
    documents, pages = counts.get("documents", {}), counts.get("pages", {})
    return {
        "run_id": record["run_id"],
        "run_date": record["directory"].rstrip("/").split("/")[-2],
        "started_at": record["started_at"],
        "duration_s": record.get("duration_s"),
        "documents": sum(documents.values()),
        "failed_documents": sum(n for status, n in documents.items() if status != Status.OK),
        "pages": sum(pages.values()),
        "failed_pages": sum(n for status, n in pages.items() if status != Status.OK),
        "answers": counts.get("answers", 0),
        "rows": counts.get("rows", 0),
        "model_id": record.get("model", {}).get("id"),
        "input": record.get("input"),
        "run_order": order,
    }


class AnswerStore:
    """The committed runs under ``output`` (or only ``run_id``), ready for SQL."""

    def __init__(self, output: str, run_id: str | None = None, storage: StorageConfig | None = None) -> None:
        import duckdb

        storage = storage or StorageConfig()
        records = committed_runs(output, storage)
        if not records:
            raise QueryError(f"no committed runs under {output}")
        if run_id is not None:
            selected = [record for record in records if record["run_id"] == run_id]
            if not selected:
                known = ", ".join(record["run_id"] for record in records[-5:]) or "none"
                raise QueryError(f"no committed run {run_id!r} under {output} (latest committed: {known})")
            records = selected
        self.records = records
        filesystem, _ = filesystem_for(output, storage)
        paths = [f"{record['directory']}/{name}" for record in records for name in record["files"]]
        rows = (
            ds.dataset(paths, schema=OUTPUT_SCHEMA, format="parquet", filesystem=filesystem)
            if paths
            else OUTPUT_SCHEMA.empty_table()
        )
        self.connection = duckdb.connect()
        self.connection.register("all_rows", rows)
        run_table = pa.Table.from_pylist([_run_row(i, r) for i, r in enumerate(records)], schema=RUNS_SCHEMA)
        self.connection.register("runs", run_table)
        self.connection.execute(f"CREATE VIEW answers AS {'SELECT * FROM all_rows' if run_id else CURRENT_ANSWERS_SQL}")

    def reader(self, sql: str, parameters: Sequence[Any] | None = None) -> pa.RecordBatchReader:
        """The result of ``sql`` as a stream of record batches."""
        import duckdb

        try:
            relation = self.connection.sql(sql, params=list(parameters) if parameters else None)
        except duckdb.Error as error:
            tables = "\n".join(f"  {name}: {', '.join(columns)}" for name, columns in QUERYABLE_COLUMNS.items())
            raise QueryError(f"{error}\n\nqueryable tables and their columns:\n{tables}") from None
        if relation is None:
            raise QueryError("the statement returned no rows; docqa query runs SELECT statements")
        return relation.to_arrow_reader(STREAM_BATCH_ROWS)

    def question_ids(self) -> list[str]:
        """Question ids in the order of the latest run's config, then any others the runs asked."""
        ordered: list[str] = []
        for record in reversed(self.records):
            for question in record.get("config", {}).get("questions", []):
                if question["id"] not in ordered:
                    ordered.append(question["id"])
        asked = self.reader("SELECT DISTINCT question_id FROM answers WHERE question_id IS NOT NULL").read_all()
        return ordered + sorted(set(asked.column(0).to_pylist()) - set(ordered))

    def answers_of(self, document: str) -> pa.RecordBatchReader:
        """All current answers of one document (a URI, or a substring matching exactly one document)."""
        matches = self.reader(
            "SELECT DISTINCT document FROM answers WHERE document = $1 OR contains(document, $1) ORDER BY 1",
            [document],
        ).read_all()
        documents = matches.column(0).to_pylist()
        if document in documents:
            documents = [document]
        if not documents:
            raise QueryError(f"no document matches {document!r}")
        if len(documents) > 1:
            listed = "\n".join(f"  {uri}" for uri in documents[:20])
            raise QueryError(f"{len(documents)} documents match {document!r}; name one of them:\n{listed}")
        return self.reader(
            "SELECT page_number, question_id, question, answer, confidence, status, error, run_id FROM answers"
            " WHERE document = $1 ORDER BY page_number NULLS FIRST, question_id",
            documents,
        )

    def table(self, questions: Sequence[str] | None = None, all_pages: bool = False) -> pa.RecordBatchReader:
        """One row per document, one column per question: the answer of the first page that answered it,
        or with ``all_pages`` every page's answer as "p1: … | p2: …"."""
        known = self.question_ids()
        wanted = list(questions) if questions else known
        unknown = [qid for qid in wanted if qid not in known]
        if unknown:
            raise QueryError(f"unknown question id(s) {unknown}; the runs asked: {known}")
        columns = []
        for index, qid in enumerate(wanted):
            value = (
                "string_agg('p' || page_number || ': ' || answer, ' | ' ORDER BY page_number)"
                if all_pages
                else "arg_min(answer, page_number)"
            )
            alias = '"' + qid.replace('"', '""') + '"'
            columns.append(f"{value} FILTER (WHERE status = 'ok' AND question_id = ${index + 1}) AS {alias}")
        select = ",\n    ".join(
            [
                "document",
                "max(num_pages) AS num_pages",
                "CASE WHEN bool_and(status = 'ok') THEN 'ok' ELSE string_agg(DISTINCT status, ',' ORDER BY status)"
                " FILTER (WHERE status <> 'ok') END AS status",
                *columns,
            ]
        )
        return self.reader(f"SELECT {select}\nFROM answers GROUP BY document ORDER BY document", wanted)

    def failures(self) -> pa.RecordBatchReader:
        """Documents and pages whose current rows are not answers, with the reason; one row per page."""
        return self.reader(
            "SELECT document, page_number, status, any_value(error) AS error, count(question_id) AS questions,"
            " any_value(run_id) AS run_id FROM answers WHERE status <> 'ok'"
            " GROUP BY document, page_number, status ORDER BY document, page_number NULLS FIRST"
        )

    def runs(self) -> pa.RecordBatchReader:
        return self.reader("SELECT * EXCLUDE (run_order) FROM runs ORDER BY run_order")


# The same operations as whole tables, for notebooks: ``query(...).to_pandas()`` for a DataFrame.


def query(output: str, sql: str, run: str | None = None, storage: StorageConfig | None = None) -> pa.Table:
    return AnswerStore(output, run, storage).reader(sql).read_all()


def answers(output: str, document: str, run: str | None = None, storage: StorageConfig | None = None) -> pa.Table:
    return AnswerStore(output, run, storage).answers_of(document).read_all()


def table(
    output: str,
    questions: Sequence[str] | None = None,
    run: str | None = None,
    all_pages: bool = False,
    storage: StorageConfig | None = None,
) -> pa.Table:
    return AnswerStore(output, run, storage).table(questions, all_pages).read_all()


def failures(output: str, run: str | None = None, storage: StorageConfig | None = None) -> pa.Table:
    return AnswerStore(output, run, storage).failures().read_all()


def runs(output: str, storage: StorageConfig | None = None) -> pa.Table:
    return AnswerStore(output, None, storage).runs().read_all()
