"""Reading answers back: SQL over the output's Delta tables, and the four questions users ask most.

DuckDB runs in-process over pyarrow datasets of the Delta tables (``OutputTables.files_of``),
so local folders and s3:// prefixes read the same way and only committed data is ever seen. Relations:

- ``answers``: the ``current`` table: per document, the rows of the latest run that processed it. With a
  run id: that run's rows as they are (from the ``answers`` table).
- ``current``: the same as ``answers`` without a run id.
- ``all_rows``: the ``answers`` table: every row of every run (or of the selected run).
- ``runs``: one row per run, with its state (running, committed, failed).
- ``items``: the records of list and object answers in ``current``, one row per field; and per list or
  object question ID a view ``items_ID``: one row per record, its fields as typed columns.
- ``reviews``: what people decided about answers (``docqa review``); ``reviewed``: ``answers`` with the
  latest decision over the model's answer (``review``: accepted, corrected, rejected); the ``documents``
  view reads it.

Time travel: ``version`` reads ``current`` as of that Delta version (and the other tables as of its commit
time); ``as_of`` reads all three as of a timestamp. Results stream as Arrow record batches
(``AnswerStore.reader``); the module functions return whole pyarrow Tables for notebooks (``.to_pandas()``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from jobs.views import (
    LAST_HEARTBEAT_SQL,
    LEASE_END_SQL,
    LOST_SQL,
    REVIEWED_ITEMS_SQL,
    REVIEWED_SQL,
    SHOWN_STATE_SQL,
    VALUE_COLUMN,
    reduced_columns,
    sql_identifier,
)
from pipeline.config import StorageConfig, ValuesConfig
from pipeline.questions import RECORD_TYPES, QuestionTemplate
from pipeline.storage import check_bucket, is_s3
from pipeline.tables import (
    ANSWER_SCHEMA,
    ANSWERS,
    CURRENT,
    ITEM_SCHEMA,
    ITEMS,
    REVIEW_SCHEMA,
    REVIEWS,
    RUN_SCHEMA,
    RUNS,
    OutputTables,
    TableError,
    commit_times,
    sql_string,
)

STREAM_BATCH_ROWS = 10_000
RUN_COLUMNS = [name for name in RUN_SCHEMA.names if name != "record"]
# What `docqa runs` shows unless --all: id, state, date, documents, pages, failures, duration.
RUN_SUMMARY_COLUMNS = ["run_id", "state", "run_date", "documents", "pages", "failed_documents", "duration_s"]
# What `docqa answers` shows of each answer: the answer, its typed value and where it is on the page.
ANSWER_COLUMNS = (
    "page_number question_id question answer confidence value_number value_currency value_date value_boolean"
    " value_status answer_source evidence evidence_text evidence_bbox status error run_id"
).split()
QUERYABLE_COLUMNS = {
    "answers": ANSWER_SCHEMA.names,
    "current": ANSWER_SCHEMA.names,
    "all_rows": ANSWER_SCHEMA.names,
    "runs": RUN_SCHEMA.names,
    "items": ITEM_SCHEMA.names,
    "reviews": REVIEW_SCHEMA.names,
    "reviewed": [*ANSWER_SCHEMA.names, "review"],
    "reviewed_items": [*ITEM_SCHEMA.names, "review"],
    "documents": ["document", "num_pages", "status", "per question ID: ID, ID_value, ID_currency, ID_page"],
    "items_ID": ["document", "page_number", "item", "per field F: F (typed), F_currency (money)"],
}


class QueryError(ValueError):
    """A query the engine refused, or a run or document that does not exist; the message says what to do."""


def parse_as_of(text: str) -> datetime:
    """An ISO 8601 date or timestamp; without a time zone it is UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise QueryError(f"--as-of {text!r} is not an ISO 8601 timestamp (e.g. 2026-11-24T06:00:00Z)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class AnswerStore:
    """The output's tables (the latest versions, or as of ``version`` / ``as_of``), ready for SQL; with
    ``run_id``, ``answers`` holds that run's rows."""

    def __init__(
        self,
        output: str,
        run_id: str | None = None,
        storage: StorageConfig | None = None,
        version: int | None = None,
        as_of: datetime | None = None,
    ) -> None:
        import duckdb

        tables = OutputTables(output, storage or StorageConfig())
        if is_s3(output):  # fail fast, and as `docqa run` does, on a wrong endpoint, bucket or credentials
            check_bucket(output, tables.storage)
        try:
            current = tables.open(CURRENT)
            if current is None:
                raise QueryError(f"no docqa output under {output} (no Delta table at {tables.uri(CURRENT)})")
            asked = None
            if version is not None:  # `current` at that version, the other tables as of its commit
                times = commit_times(current)
                if version not in times:
                    raise QueryError(
                        f"{output} has no version {version} of `current`: its versions are 0 to {max(times)}"
                    )
                as_of, asked = times[version], f"version {version}"
                current = tables.open(CURRENT, version)
                tables.check_readable(CURRENT, current, asked)
                asked = f"the version as of {as_of.isoformat()} (`current` version {version}'s commit)"
            elif as_of is not None:
                first = min(commit_times(current).values())
                if as_of < first:
                    raise QueryError(
                        f"{output} has no version as of {as_of.isoformat()}: its first commit is {first.isoformat()}"
                    )
                current.load_as_version(as_of)
                asked = f"the version as of {as_of.isoformat()}"
                tables.check_readable(CURRENT, current, asked)
            datasets = {
                CURRENT: tables.files_of(current, CURRENT),
                ANSWERS: tables.dataset(ANSWERS, as_of, asked),
                RUNS: tables.dataset(RUNS, as_of, asked),
                ITEMS: tables.dataset(ITEMS, as_of, asked),
                REVIEWS: tables.dataset(REVIEWS, as_of, asked),
            }
        except TableError as error:
            raise QueryError(str(error)) from None
        self.connection = duckdb.connect()
        self.documents_view = False  # created by the first statement that names it (it reads every run record)
        self.item_views: set[str] = set()  # the items_ID views made so far (likewise)
        self.connection.register("runs", datasets[RUNS])
        self.connection.register("items", datasets[ITEMS])
        self.connection.register("reviews", datasets[REVIEWS])
        self.connection.register("all_rows", datasets[ANSWERS])
        self.connection.register("current", datasets[CURRENT])
        # SQL reads the registered tables and nothing else: no file or URL is read or written (COPY,
        # read_csv, ATTACH), and the setting cannot be turned back on.
        self.connection.execute("SET enable_external_access = false")
        self.connection.execute("SET lock_configuration = true")
        if run_id is None:
            self.connection.execute("CREATE VIEW answers AS SELECT * FROM current")
        else:
            self._select_run(output, run_id)
        self.connection.execute(f"CREATE VIEW reviewed AS {REVIEWED_SQL}")
        self.connection.execute(f"CREATE VIEW reviewed_items AS {REVIEWED_ITEMS_SQL}")
        self.moment = as_of or datetime.now(UTC)  # the moment this snapshot shows: a run's lease is judged at it

    def _select_run(self, output: str, run_id: str) -> None:
        """``answers`` as the rows of run ``run_id``."""
        if not self.reader("SELECT 1 FROM runs WHERE run_id = $1", [run_id]).read_all().num_rows:
            latest = self.reader("SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 5").read_all()
            known = ", ".join(latest.column(0).to_pylist()) or "none"
            raise QueryError(f"no run {run_id!r} under {output} (latest: {known})")
        self.connection.execute(f"CREATE VIEW answers AS SELECT * FROM all_rows WHERE run_id = {sql_string(run_id)}")

    def reader(self, sql: str, parameters: Sequence[Any] | None = None) -> pa.RecordBatchReader:
        """The result of ``sql``, one SELECT (or WITH ... SELECT) statement, as a stream of record batches."""
        import duckdb

        try:
            kinds = [statement.type.name for statement in duckdb.extract_statements(sql)]
            if kinds != ["SELECT"]:
                found = f"a {kinds[0]} statement" if len(kinds) == 1 else f"{len(kinds)} statements {kinds}"
                raise QueryError(
                    f"docqa query runs one read-only SELECT (or WITH ... SELECT) statement; this is {found}"
                )
            if not self.documents_view and re.search(r"\bdocuments\b", sql, re.IGNORECASE):
                self.connection.execute(f"CREATE VIEW documents AS {self.documents_sql()}")
                self.documents_view = True
            named = set(re.findall(r"\bitems_([A-Za-z0-9_]+)", sql))
            if named:
                records = {qid for qid, t in self.question_templates().items() if t.get("type") in RECORD_TYPES}
                for question_id in named & records:
                    self._item_view(question_id)
            relation = self.connection.sql(sql, params=list(parameters) if parameters else None)
        except duckdb.Error as error:
            tables = "\n".join(f"  {name}: {', '.join(columns)}" for name, columns in QUERYABLE_COLUMNS.items())
            raise QueryError(f"{error}\n\nqueryable tables and their columns:\n{tables}") from None
        return relation.to_arrow_reader(STREAM_BATCH_ROWS)

    def question_templates(self) -> dict[str, dict[str, Any]]:
        """Each question's template (as the latest committed run that asked it wrote it), in the order of the
        latest run's config, then any others the runs asked (as plain text questions)."""
        committed = self.reader("SELECT record FROM runs WHERE state = 'committed' ORDER BY started_at DESC")
        templates: dict[str, dict[str, Any]] = {}
        for record in map(json.loads, committed.read_all().column(0).to_pylist()):
            for question in record.get("config", {}).get("questions", []):
                templates.setdefault(question["id"], question)
        asked = self.reader("SELECT DISTINCT question_id FROM answers WHERE question_id IS NOT NULL").read_all()
        for question_id in sorted(set(asked.column(0).to_pylist()) - set(templates)):
            templates[question_id] = {"id": question_id}
        return templates

    def values_config(self) -> ValuesConfig:
        """How the latest committed run read typed answers (its locale)."""
        latest = self.reader("SELECT record FROM runs WHERE state = 'committed' ORDER BY started_at DESC LIMIT 1")
        records = latest.read_all().column(0).to_pylist()
        values = json.loads(records[0]).get("config", {}).get("values", {}) if records else {}
        return ValuesConfig.model_validate(values)

    def documents_sql(
        self, questions: Sequence[str] | None = None, reduce: str | None = None, reviewed: bool = True
    ) -> str:
        """One row per document: its page count, its status, and per question its answer reduced to one
        (the question's ``reduce``, or ``reduce`` for all), its typed value and the page it came from; with
        ``reviewed`` (the default) a person's decision over the model's answer, else the model's alone."""
        templates = self.question_templates()
        wanted = list(questions) if questions else list(templates)
        unknown = [qid for qid in wanted if qid not in templates]
        if unknown:
            raise QueryError(f"unknown question id(s) {unknown}; the runs asked: {list(templates)}")
        columns = [
            "document",
            "max(num_pages) AS num_pages",
            "CASE WHEN bool_and(status = 'ok') THEN 'ok' ELSE string_agg(DISTINCT status, ',' ORDER BY status)"
            " FILTER (WHERE status <> 'ok') END AS status",
        ]
        relation = "reviewed" if reviewed else "(SELECT *, NULL::VARCHAR AS review FROM answers)"
        decided = self.reader(f"SELECT DISTINCT question_id FROM {relation} WHERE review IS NOT NULL").read_all()
        reviewed_questions = set(decided.column(0).to_pylist())
        for qid in wanted:
            template = templates[qid]
            how = reduce or template.get("reduce", "first")
            columns += reduced_columns(qid, template.get("type", "text"), how, qid in reviewed_questions)
        return f"SELECT {', '.join(columns)} FROM {relation} GROUP BY document"

    def _item_view(self, question_id: str) -> None:
        """The view ``items_ID`` of a list or object question: one row per record (document, page_number,
        item), each field a column of its type (text and choice: the answer; number: a double; money: a
        double and FIELD_currency; date; boolean)."""
        if question_id in self.item_views:
            return
        template = self.question_templates().get(question_id, {})
        if template.get("type") not in RECORD_TYPES:
            raise QueryError(f"{question_id!r} is not a list or object question of these runs: it has no items")
        columns = ["document", "page_number", "item"]
        for field in template.get("fields", []):
            name, of_field = field["name"], f"FILTER (WHERE field = {sql_string(field['name'])})"
            typed = VALUE_COLUMN.get(field.get("type", "text"), "answer")
            columns.append(f"any_value({typed}) {of_field} AS {sql_identifier(name)}")
            if field.get("type") == "money":
                columns.append(f"any_value(value_currency) {of_field} AS {sql_identifier(name + '_currency')}")
        self.connection.execute(
            f"CREATE VIEW {sql_identifier('items_' + question_id)} AS SELECT {', '.join(columns)} FROM reviewed_items"
            f" WHERE question_id = {sql_string(question_id)} AND review IS DISTINCT FROM 'rejected'"
            " GROUP BY document, page_number, item"
        )
        self.item_views.add(question_id)

    def items_of(self, question_id: str) -> pa.RecordBatchReader:
        """``items_ID``: one row per record of a list or object question, by document and item."""
        self._item_view(question_id)  # or the reason there is none
        return self.reader(f"SELECT * FROM {sql_identifier('items_' + question_id)} ORDER BY document, item")

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
            f"SELECT {', '.join(ANSWER_COLUMNS)} FROM answers"
            " WHERE document = $1 ORDER BY page_number NULLS FIRST, question_id",
            documents,
        )

    def table(self, questions: Sequence[str] | None = None, all_pages: bool = False) -> pa.RecordBatchReader:
        """The ``documents`` view (one row per document), of ``questions`` only if given; with ``all_pages``
        every page's answer as "p1: … | p2: …" whatever the questions' ``reduce``."""
        return self.reader(self.documents_sql(questions, "all" if all_pages else None) + " ORDER BY document")

    def failures(self) -> pa.RecordBatchReader:
        """Documents and pages whose current rows are not answers, with the reason; one row per page."""
        return self.reader(
            "SELECT document, page_number, status, any_value(error) AS error, count(question_id) AS questions,"
            " any_value(run_id) AS run_id FROM answers WHERE status <> 'ok'"
            " GROUP BY document, page_number, status ORDER BY document, page_number NULLS FIRST"
        )

    def runs(self, all_columns: bool = False, show_lost: bool = False) -> pa.RecordBatchReader:
        """One row per run, oldest first: the summary columns (id, state, date, documents, pages, failures,
        duration), or with ``all_columns`` every column but the record. With ``show_lost`` (`docqa runs`) a
        ``running`` run whose lease has passed shows as ``lost (no heartbeat since HH:MM UTC)``
        (``lost_runs``); without it ``state`` is the table's (what scripts filter on)."""
        columns = RUN_COLUMNS if all_columns else RUN_SUMMARY_COLUMNS
        if not show_lost:
            return self.reader(f"SELECT {', '.join(columns)} FROM runs ORDER BY started_at, run_id")
        shown = [SHOWN_STATE_SQL if column == "state" else column for column in columns]
        return self.reader(f"SELECT {', '.join(shown)} FROM runs ORDER BY started_at, run_id", [self.moment])

    def lost_runs(self) -> list[tuple[str, datetime, datetime]]:
        """The ``running`` runs whose driver stopped renewing their lease (killed from outside, or its machine
        lost) before this snapshot's moment: (run id, last heartbeat, lease end), oldest first. Their row
        stays ``running`` until the next run on the output marks it ``abandoned`` (pipeline/commits.py)."""
        lost = self.reader(
            f"SELECT run_id, {LAST_HEARTBEAT_SQL}, {LEASE_END_SQL} FROM runs WHERE {LOST_SQL}"
            " ORDER BY started_at, run_id",
            [self.moment],
        ).read_all()
        return [
            (run_id, heartbeat.astimezone(UTC), lease_end.astimezone(UTC))
            for run_id, heartbeat, lease_end in zip(*(column.to_pylist() for column in lost.columns), strict=True)
        ]

    def input_roots(self) -> list[str]:
        """The folders or prefixes the runs read (their ``input`` up to its first glob character; list files
        left out), longest first: a document under one of them can be shown relative to it."""
        inputs = self.reader("SELECT DISTINCT input FROM runs WHERE input IS NOT NULL").read_all().column(0)
        roots = set()
        for location in inputs.to_pylist():
            if location.endswith(".txt"):
                continue
            cut = min((location.index(char) for char in "*?[" if char in location), default=len(location))
            roots.add(location[:cut].rsplit("/", 1)[0] if cut < len(location) else location.rstrip("/"))
        return sorted(roots, key=len, reverse=True)


def template_question(templates: dict[str, dict[str, Any]], question_id: str) -> QuestionTemplate:
    """The question ``question_id`` as the runs recorded it (``AnswerStore.question_templates``); a question
    known only from its rows is a text question."""
    template = templates.get(question_id, {"id": question_id})
    known = {key: value for key, value in template.items() if key in QuestionTemplate.model_fields}
    return QuestionTemplate.model_validate(known | {"text": template.get("text") or "?"})


# The same operations as whole tables, for notebooks: ``query(...).to_pandas()`` for a DataFrame. Each takes
# the snapshot to read: ``version`` (of ``current``) or ``as_of`` (a datetime), the latest by default.


def query(output: str, sql: str, run: str | None = None, storage: StorageConfig | None = None, **snapshot) -> pa.Table:
    return AnswerStore(output, run, storage, **snapshot).reader(sql).read_all()


def answers(
    output: str, document: str, run: str | None = None, storage: StorageConfig | None = None, **snapshot
) -> pa.Table:
    return AnswerStore(output, run, storage, **snapshot).answers_of(document).read_all()


def table(
    output: str,
    questions: Sequence[str] | None = None,
    run: str | None = None,
    all_pages: bool = False,
    storage: StorageConfig | None = None,
    **snapshot,
) -> pa.Table:
    return AnswerStore(output, run, storage, **snapshot).table(questions, all_pages).read_all()


def failures(output: str, run: str | None = None, storage: StorageConfig | None = None, **snapshot) -> pa.Table:
    return AnswerStore(output, run, storage, **snapshot).failures().read_all()


def runs(output: str, storage: StorageConfig | None = None, all_columns: bool = True, **snapshot) -> pa.Table:
    return AnswerStore(output, None, storage, **snapshot).runs(all_columns).read_all()
