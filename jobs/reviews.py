"""What a person checks, and what they decided: an output's review queue, and reviews recorded as rows of
its ``reviews`` table (by ``docqa review``'s page and API, and by Label Studio imports).

The queue holds, per question, the answers of ``current`` that nobody has reviewed yet (for this version
of the document and this answer) and that are doubtful: a model error, a typed value that did not parse, a
number, money or date with no evidence on the page, a list cut by max_new_tokens, or a confidence below the
question's threshold. List and object
answers are reviewed field by field (the ``items`` table). A review appends one row (``ReviewRow``); the
``reviewed`` view of docqa query (jobs/query.py) puts the latest decision over the model's answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
from datetime import UTC, date, datetime
from typing import Any

import pyarrow as pa

from jobs.query import AnswerStore, template_question
from jobs.views import LATEST_REVIEWS_SQL
from pipeline.config import StorageConfig
from pipeline.questions import QuestionTemplate
from pipeline.record_schema import to_table
from pipeline.records import ReviewRow
from pipeline.structured import RecordField
from pipeline.tables import REVIEWS, OutputTables
from pipeline.values import ValueParser

DECISIONS = {"accept": "accepted", "correct": "corrected", "reject": "rejected"}
DEFAULT_BELOW = 0.5
REVIEW_ORIGIN, LABEL_STUDIO_ORIGIN = "docqa-review", "label-studio"


@dataclasses.dataclass(slots=True)
class QueueEntry:
    """One answer (or one field of a record) waiting for a person, with why it waits."""

    id: str
    document: str
    source_version: str | None
    page_number: int
    question_id: str
    item: int | None
    field: str | None
    question: str | None
    answer: str | None
    value: str | None  # the typed value as text (12.5 EUR, 2026-01-03, true), null for text answers
    value_status: str | None
    confidence: float | None
    reason: str
    evidence_bbox: dict[str, float] | None
    run_id: str | None
    config_fingerprint: str | None

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def entry_id(document: str, source_version: str | None, page: int, question: str, item, field, answer) -> str:
    """A queue entry's id: a digest of what the review speaks for, so that no path or name travels in URLs."""
    key = json.dumps([document, source_version, page, question, item, field, answer])
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _threshold_sql(below: float, thresholds: dict[str, float], question_id: str) -> str:
    """The confidence threshold of the row's question: its own (from ``docqa evaluate``), else ``below``."""
    cases = " ".join(f"WHEN {_literal(qid)} THEN {float(value)!r}::DOUBLE" for qid, value in thresholds.items())
    # DOUBLE, not DECIMAL: the reason reads "below 0.5", not "below 0.50"
    return f"(CASE {question_id} {cases} ELSE {float(below)!r}::DOUBLE END)" if cases else repr(float(below))


def _value_text(value: str) -> str:
    """SQL: a typed value as text (12.5 EUR, 2026-01-03, true); ``value``: the columns' prefix."""
    return (
        f"coalesce(CAST({value}value_number AS VARCHAR) || coalesce(' ' || {value}value_currency, ''),"
        f" CAST({value}value_date AS VARCHAR), CAST({value}value_boolean AS VARCHAR))"
    )


def _reason_sql(threshold: str, row: str, value: str) -> str:
    """SQL: why an answer waits for review, or null; ``row`` prefixes the answer row's columns (status,
    error, confidence, and whether a list was cut by max_new_tokens: each field of its complete records
    waits), ``value`` those of the value under review (the answer's, or a record field's). Only a number,
    money or date lacks evidence: a boolean's or a choice's label is never looked for on the page."""
    return (
        f"CASE WHEN {row}status = 'model_error' THEN 'model error: ' || coalesce({row}error, '')"
        f" WHEN {value}value_status = 'unparsed' THEN 'typed value did not parse'"
        f" WHEN {row}value_status = 'truncated' THEN 'answer cut by max_new_tokens'"
        f" WHEN {value}value_status = 'parsed' AND {value}evidence = 'none'"
        f" AND ({value}value_number IS NOT NULL OR {value}value_date IS NOT NULL) THEN 'typed value without evidence'"
        f" WHEN {row}confidence < {threshold}"
        f" THEN 'confidence ' || round({row}confidence, 2) || ' below ' || {threshold} END"
    )


def queue_sql(below: float, thresholds: dict[str, float]) -> str:
    """The queue over docqa query's relations: answers (one per page and question) and the fields of list
    and object answers, each with its reason, none reviewed for this document version and answer."""
    answers = (
        "SELECT document, source_version, page_number, question_id, NULL::INTEGER AS item, NULL::VARCHAR AS field,"
        f" question, answer, {_value_text('')} AS value, value_status, confidence,"
        f" {_reason_sql(_threshold_sql(below, thresholds, 'question_id'), '', '')} AS reason,"
        " evidence_bbox, run_id, config_fingerprint FROM reviewed"
        " WHERE question_id IS NOT NULL AND review IS NULL AND coalesce(len(items), 0) = 0"
        " AND status IN ('ok', 'model_error')"
    )
    fields = (
        "SELECT i.document, a.source_version, i.page_number, i.question_id, i.item, i.field,"
        " a.question || ' [' || i.field || ' of item ' || i.item || ']' AS question, i.answer,"
        f" {_value_text('i.')} AS value, i.value_status, a.confidence,"
        f" {_reason_sql(_threshold_sql(below, thresholds, 'i.question_id'), 'a.', 'i.')} AS reason,"
        " i.evidence_bbox, i.run_id, i.config_fingerprint"
        " FROM items i JOIN answers a USING (document, page_number, question_id)"
        f" LEFT JOIN ({LATEST_REVIEWS_SQL}) r ON r.document = i.document AND r.page_number = i.page_number"
        " AND r.question_id = i.question_id AND r.item = i.item AND r.field = i.field"
        " AND r.source_version IS NOT DISTINCT FROM a.source_version"
        " AND r.reviewed_answer IS NOT DISTINCT FROM i.answer WHERE r.review_id IS NULL"
    )
    return (
        f"SELECT * FROM ({answers} UNION ALL BY NAME {fields}) WHERE reason IS NOT NULL"
        " ORDER BY document, page_number, question_id, item NULLS FIRST, field"
    )


class ReviewBook:
    """An output's queue and its reviews: list what waits, check a correction's typed value, record a
    decision. Each listing reads the output's latest committed version (a run committing meanwhile adds to
    the queue; a reprocessed document whose answer changed comes back)."""

    def __init__(
        self,
        output: str,
        storage: StorageConfig | None = None,
        below: float = DEFAULT_BELOW,
        thresholds: dict[str, float] | None = None,
    ) -> None:
        self.output, self.storage = output, storage or StorageConfig()
        self.below, self.thresholds = below, dict(thresholds or {})
        AnswerStore(output, storage=self.storage)  # a docqa output, or QueryError (never a new empty one)
        self.tables = OutputTables(output, self.storage)
        self.tables.create()  # reviews (and any table an older output lacks), before the first decision
        self.known: dict[str, QueueEntry] = {}  # entries listed so far, by id: what the API may name
        self.templates: dict[str, dict[str, Any]] = {}
        self.parser: ValueParser | None = None

    def store(self) -> AnswerStore:
        return AnswerStore(self.output, storage=self.storage)

    def queue(self, limit: int | None = None) -> list[QueueEntry]:
        """The entries waiting, at most ``limit`` (all when None), in document, page and question order."""
        sql = queue_sql(self.below, self.thresholds) + (f" LIMIT {int(limit)}" if limit is not None else "")
        entries, store = [], self.store()
        self._read_runs(store)
        for row in store.reader(sql).read_all().to_pylist():
            identity = entry_id(
                row["document"],
                row["source_version"],
                row["page_number"],
                row["question_id"],
                row["item"],
                row["field"],
                row["answer"],
            )
            entry = QueueEntry(id=identity, **row)
            self.known[identity] = entry
            entries.append(entry)
        return entries

    def entry(self, identity: str) -> QueueEntry | None:
        """The entry of an id the queue listed (or lists now); None for any other id."""
        if identity not in self.known:
            self.queue()
        return self.known.get(identity)

    def _read_runs(self, store: AnswerStore) -> None:
        """The questions and the locale of the runs, as the latest listing saw them (a correction typed
        key by key is read without going back to the tables)."""
        self.templates, self.parser = store.question_templates(), ValueParser(store.values_config())

    def typed(self, entry: QueueEntry, answer: str | None) -> dict[str, Any]:
        """The value columns of ``answer`` read as ``entry``'s question (or field) reads answers."""
        if self.parser is None:
            self._read_runs(self.store())
        question: QuestionTemplate | RecordField = template_question(self.templates, entry.question_id)
        if question.has_records and entry.field is None:  # a whole list or object answer: its JSON as it is
            return {"answer": answer}
        if entry.field is not None:
            fields = [field for field in question.fields or [] if field.name == entry.field]
            if not fields:
                raise ValueError(f"question {entry.question_id} has no field {entry.field} any more")
            question = fields[0]
        columns = self.parser.parse(question, answer)
        columns.setdefault("answer", answer)
        return columns

    def decide(
        self, entry: QueueEntry, decision: str, answer: str | None, reviewer: str | None, origin: str = REVIEW_ORIGIN
    ) -> ReviewRow:
        """Record ``decision`` (accept, correct, reject) on ``entry``; a correction's ``answer`` is typed as
        the question reads answers. Appended to ``reviews`` (blind appends: reviewers at once never lose one)."""
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {sorted(DECISIONS)}, not {decision!r}")
        if decision == "correct":
            if not (answer or "").strip():
                raise ValueError("a correction needs the right answer")
            typed = self.typed(entry, answer.strip())
            if typed.get("value_status") == "unparsed":
                raise ValueError(f"the correction is not a value of its type: {typed.get('error')}")
        elif decision == "accept":
            typed = self.typed(entry, entry.answer)
            typed["answer"] = entry.answer
        else:
            typed = {}
        row = ReviewRow(
            review_id=secrets.token_hex(8),
            document=entry.document,
            source_version=entry.source_version,
            page_number=entry.page_number,
            question_id=entry.question_id,
            item=entry.item,
            field=entry.field,
            decision=DECISIONS[decision],
            answer=typed.get("answer"),
            value_number=typed.get("value_number"),
            value_currency=typed.get("value_currency"),
            value_date=typed.get("value_date"),
            value_boolean=typed.get("value_boolean"),
            value_status=typed.get("value_status"),
            reviewed_answer=entry.answer,
            reviewed_confidence=entry.confidence,
            run_id=entry.run_id,
            config_fingerprint=entry.config_fingerprint,
            reviewer=reviewer,
            reviewed_at=datetime.now(UTC),
            origin=origin,
        )
        self.append([row])
        self.known.pop(entry.id, None)
        return row

    def append(self, rows: list[ReviewRow]) -> None:
        from deltalake import write_deltalake

        table = to_table(rows, ReviewRow)
        self.tables.retry_commit(
            REVIEWS, lambda delta: write_deltalake(delta, table, mode="append", schema_mode="merge")
        )


def value_text(columns: dict[str, Any]) -> str | None:
    """A typed value as the queue shows it (12.5 EUR, 2026-01-03, true)."""
    if columns.get("value_number") is not None:
        currency = columns.get("value_currency")
        return f"{columns['value_number']:g}" + (f" {currency}" if currency else "")
    for name in ("value_date", "value_boolean"):
        value = columns.get(name)
        if isinstance(value, date):
            return value.isoformat()
        if value is not None:
            return str(value).lower()
    return None


def review_rows(output: str, storage: StorageConfig | None = None) -> pa.Table:
    """Every review of the output, oldest first."""
    return AnswerStore(output, storage=storage).reader("SELECT * FROM reviews ORDER BY reviewed_at").read_all()
