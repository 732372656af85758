"""The SQL of what docqa shows over the output's tables besides the tables themselves: the state `docqa runs`
gives a run whose driver is gone, the ``reviewed`` and ``reviewed_items`` views (a person's decision over the
model's answer), and the ``documents`` view's columns (one question's answers reduced to one per document)."""

from __future__ import annotations

from pipeline.tables import DEFAULT_LEASE_S, sql_string

# A `running` run whose lease has passed: its driver stopped renewing it (killed, or its machine lost). Its
# last heartbeat was its lease's end less the run's lease_s; a row without a lease (an older docqa) counts
# DEFAULT_LEASE_S from its start, as pipeline/tables.py lease_expired does. $1: the moment read (now, or the
# time-travel snapshot's).
LEASE_END_SQL = f"coalesce(lease_expires_at, started_at + to_seconds({DEFAULT_LEASE_S}))"
LAST_HEARTBEAT_SQL = (
    "coalesce(lease_expires_at - to_seconds(coalesce(TRY_CAST(json_extract_string(record, '$.config.lease_s')"
    f" AS DOUBLE), {DEFAULT_LEASE_S})), started_at)"
)
LOST_SQL = f"(state = 'running' AND {LEASE_END_SQL} < $1)"
# `docqa runs`'s state: a lost run says so (the next run on the output marks it `abandoned`).
SHOWN_STATE_SQL = (
    f"CASE WHEN {LOST_SQL} THEN 'lost (no heartbeat since '"
    f" || strftime(timezone('UTC', {LAST_HEARTBEAT_SQL}), '%H:%M') || ' UTC)' ELSE state END AS state"
)
# Reviews that speak for an answer (or a record's field): the latest decision per key, of the document's
# version and answer it was made on (a document reprocessed into a different answer is not covered by it).
REVIEW_KEY = ("document", "source_version", "page_number", "question_id", "item", "field")
LATEST_REVIEWS_SQL = (
    "SELECT * FROM reviews QUALIFY row_number() OVER"
    f" (PARTITION BY {', '.join(REVIEW_KEY)}, reviewed_answer ORDER BY reviewed_at DESC, review_id DESC) = 1"
)
REVIEWED_VALUE_COLUMNS = ("answer", "value_number", "value_currency", "value_date", "value_boolean", "value_status")
# ``answers`` with a person's decision over the model's answer: accepted (kept), corrected (the correction
# and its typed value), rejected (answer and value null); ``review`` says which, null where none.
REVIEWED_SQL = (
    "SELECT a.* REPLACE ("
    + ", ".join(
        f"CASE r.decision WHEN 'corrected' THEN r.{column} WHEN 'rejected' THEN NULL ELSE a.{column} END AS {column}"
        for column in REVIEWED_VALUE_COLUMNS
    )
    + ", CASE r.decision WHEN 'corrected' THEN 'ok' ELSE a.status END AS status"
    + f"), r.decision AS review FROM answers a LEFT JOIN ({LATEST_REVIEWS_SQL}) r"
    " ON r.item IS NULL AND r.document = a.document AND r.source_version IS NOT DISTINCT FROM a.source_version"
    " AND r.page_number = a.page_number AND r.question_id = a.question_id"
    " AND r.reviewed_answer IS NOT DISTINCT FROM a.answer"
)

# ``items`` likewise, field by field (a review of a field names its item and field).
REVIEWED_ITEMS_SQL = (
    "SELECT i.* REPLACE ("
    + ", ".join(
        f"CASE r.decision WHEN 'corrected' THEN r.{column} WHEN 'rejected' THEN NULL ELSE i.{column} END AS {column}"
        for column in REVIEWED_VALUE_COLUMNS
    )
    + f"), r.decision AS review FROM items i JOIN answers a USING (document, page_number, question_id)"
    f" LEFT JOIN ({LATEST_REVIEWS_SQL}) r ON r.document = i.document AND r.page_number = i.page_number"
    " AND r.question_id = i.question_id AND r.item = i.item AND r.field = i.field"
    " AND r.source_version IS NOT DISTINCT FROM a.source_version AND r.reviewed_answer IS NOT DISTINCT FROM i.answer"
)


# The typed-value column of each question type, and how a document's answers are reduced to one.
VALUE_COLUMN = {"number": "value_number", "money": "value_number", "date": "value_date", "boolean": "value_boolean"}


def reduced_columns(question_id: str, question_type: str, reduce: str, reviewed: bool = False) -> list[str]:
    """SQL aggregates of one question's document-level answer (over the ``reviewed`` view: a person's
    decision over the model's): ``ID`` (the answer), ``ID_value`` and, for money, ``ID_currency`` (typed
    questions), ``ID_page`` (the page it came from), and with ``reviewed`` ``ID_review`` (accepted or
    corrected, null where nobody reviewed it; rejected, the answer null, where a reviewer rejected the
    question's answer and no other page's stands in for it). Only the question's answered rows (status ok;
    for typed questions, value parsed; not rejected by a reviewer) take part; ``all`` gives every page's as text
    ("p1: … | p2: …", pages "1, 2, 3"), so that every output format and engine takes it."""
    answered = (
        f"FILTER (WHERE status = 'ok' AND question_id = {sql_string(question_id)}"
        " AND coalesce(value_status, 'parsed') = 'parsed' AND review IS DISTINCT FROM 'rejected')"
    )
    fields = {question_id: "answer"}
    if question_type in VALUE_COLUMN:
        fields[f"{question_id}_value"] = VALUE_COLUMN[question_type]
    if question_type == "money":
        fields[f"{question_id}_currency"] = "value_currency"
    fields[f"{question_id}_page"] = "page_number"
    if reviewed:
        fields[f"{question_id}_review"] = "review"
    # The row each field comes from: the same for all of a question's fields (``*_null``: a null value is
    # a value, not a reason to look at another row); the most confident model answer, then the first page.
    function, key = {
        "first": ("arg_min_null", "page_number"),
        "last": ("arg_max_null", "page_number"),
        "max_confidence": ("arg_max_null", "[coalesce(confidence, -1.0), -page_number]"),
    }.get(reduce, (None, None))
    columns = []
    for name, column in fields.items():
        if function is None:  # all: every page's, as text ("p1: … | p2: …"; pages "1, 2"), for any engine or format
            shown = "page_number" if column == "page_number" else f"'p' || page_number || ': ' || {column}"
            separator = "', '" if column == "page_number" else "' | '"
            aggregate = f"string_agg({shown}, {separator} ORDER BY page_number)"
        else:
            aggregate = f"{function}({column}, {key})"
        value = f"{aggregate} {answered}"
        if column == "review":  # a rejected answer takes no part; where no other stands in for it, it says so
            rejected = f"bool_or(review = 'rejected') FILTER (WHERE question_id = {sql_string(question_id)})"
            value = f"CASE WHEN count(*) {answered} = 0 AND {rejected} THEN 'rejected' ELSE {value} END"
        columns.append(f"{value} AS {sql_identifier(name)}")
    return columns


def sql_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
