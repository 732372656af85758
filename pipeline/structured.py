"""List and object questions: records of typed fields (line items, parties, rows of a statement).

A question of ``type: list`` asks for zero or more records per page, ``type: object`` for one; each record
has the question's ``fields``, each of a scalar type (text, number, money, date, boolean, choice). From the
fields come the prompt the model sees (``record_prompt``) and the JSON Schema its answer is decoded under
(``record_schema``: compiled by xgrammar in actors/constraints.py, so that every answer the model can give
is JSON valid against it). An answer is read back into records (``read_records``), each field typed by the
parsers of pipeline/values.py and looked up among the page's words for its own evidence (actors/answering.py);
a document's records become the rows of the ``items`` table, numbered across its pages (``document_items``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Literal, Protocol

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.grammars import BOOLEAN_ANSWERS, CONSTRAINED_FORMS, check_choices
from pipeline.records import ITEM_SCHEMA

TRUNCATED = "truncated"  # value_status of an answer cut by max_new_tokens: a list keeps its complete records
# The JSON the model writes: no whitespace between tokens, keys in the fields' order (xgrammar's
# ``any_whitespace=False`` and these separators), so that no token is spent on layout.
SEPARATORS = (",", ":")


ScalarType = Literal["text", "number", "money", "date", "boolean", "choice"]


class RecordField(BaseModel):
    """One field of the records a list or object question asks for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="The field's key in the JSON answer; a column of items views."
    )
    type: ScalarType = Field("text", description="The field's type, as a question's (text, number, money, ...).")
    choices: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="With type choice: the allowed values."
    )
    description: str | None = Field(
        None, max_length=200, description="What the field holds, told to the model after its name."
    )

    @model_validator(mode="after")
    def _consistent(self) -> RecordField:
        check_choices(self.type, self.choices)
        return self

    @property
    def allowed_answers(self) -> list[str] | None:
        """The only values a choice or boolean field can have."""
        return BOOLEAN_ANSWERS if self.type == "boolean" else self.choices


class RecordQuestion(Protocol):
    """What of a list or object question (pipeline/questions.py ``QuestionTemplate``) its schema and prompt
    are made of."""

    type: str
    fields: list[RecordField] | None
    max_items: int


def field_schema(field: RecordField) -> dict[str, Any]:
    """A field's value: a string in its type's form (the forms of pipeline/grammars.py; choices and
    booleans as their allowed answers), or null where the page does not show it."""
    if field.type == "text":
        value: dict[str, Any] = {"type": "string"}
    elif field.type in CONSTRAINED_FORMS:
        # Anchored: a standard validator reads a pattern as a search ("x1" would pass as a number); xgrammar
        # reads it as the whole string either way, so the anchors leave the decoding as it was.
        value = {"type": "string", "pattern": f"^(?:{CONSTRAINED_FORMS[field.type]})$"}
    else:
        allowed = BOOLEAN_ANSWERS if field.type == "boolean" else list(field.choices or [])
        value = {"type": "string", "enum": allowed}
    return {"anyOf": [value, {"type": "null"}]}


def record_schema(question: RecordQuestion) -> dict[str, Any]:
    """The JSON Schema of the question's answer: one record (object), or an array of at most ``max_items``
    records (list); every field present, no other key."""
    fields = question.fields or []
    record = {
        "type": "object",
        "properties": {field.name: field_schema(field) for field in fields},
        "required": [field.name for field in fields],
        "additionalProperties": False,
    }
    if question.type == "object":
        return record
    return {"type": "array", "items": record, "maxItems": question.max_items}


def record_prompt(question: RecordQuestion, text: str) -> str:
    """The question as the model is asked it: ``text`` (the template filled in), then what to answer with.
    E.g. "List every line item of this invoice.\\nAnswer with a JSON list of objects with the keys
    description (text), quantity (number), amount (money). Use null for a value the page does not show.\""""
    keys = ", ".join(
        f"{field.name} ({field.type}{': ' + field.description if field.description else ''})"
        for field in question.fields or []
    )
    shape = "a JSON list of objects" if question.type == "list" else "a JSON object"
    return f"{text}\nAnswer with {shape} with the keys {keys}. Use null for a value the page does not show."


def read_records(answer: str | None, many: bool) -> tuple[list[dict[str, Any]], str | None]:
    """The records of a list (``many``) or object answer, and why it was not read whole: None (read whole),
    ``truncated`` (a list cut short: the records before the cut are kept), or the reason it is not JSON.

    Written by hand over ``json.JSONDecoder.raw_decode``, which reads one value and says where it ends:
    the complete records of a cut list are the values read before the first that does not end. A library
    that repairs partial JSON (partial-json-parser, json-repair) completes the cut record too, with fields
    the model never wrote."""
    text = (answer or "").strip()
    decoder = json.JSONDecoder()
    if not many:
        try:
            record, end = decoder.raw_decode(text)
        except json.JSONDecodeError as error:
            return [], f"{TRUNCATED}: not a whole JSON object ({error.msg}, character {error.pos})"
        if not isinstance(record, dict) or text[end:].strip():
            return [], "not one JSON object"
        return [record], None
    if not text.startswith("["):
        return [], f"{TRUNCATED}: no JSON list" if not text else "not a JSON list"
    records, position = [], 1
    while True:
        while position < len(text) and text[position] in " \n\r\t,":
            position += 1
        if position < len(text) and text[position] == "]":
            return records, None if not text[position + 1 :].strip() else "text after the JSON list"
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return records, TRUNCATED
        if isinstance(record, dict):
            records.append(record)


def closed_list(records: list[dict[str, Any]]) -> str:
    """The answer of a list cut by max_new_tokens, closed as far as it parsed: its complete records as the
    JSON list the model would have written had it stopped after them (compact, characters as written)."""
    return json.dumps(records, separators=SEPARATORS, ensure_ascii=False)


def _normalized(text: str) -> str:
    return "".join(character for character in text.casefold() if character.isalnum())


def is_header(record: dict[str, Any], fields: Sequence[RecordField]) -> bool:
    """Whether a record is the table's header row read as an item (a page that repeats it): each of its
    values is a field's name or description ("Unit price" for ``unit_price``), and it has one at least."""
    labels = {_normalized(field.name) for field in fields}
    labels |= {_normalized(field.description) for field in fields if field.description}
    values = [value for value in record.values() if value is not None]
    return bool(values) and all(isinstance(value, str) and _normalized(value) in labels for value in values)


def document_items(rows: pa.Table) -> pa.Table:
    """The ``items`` rows of answer rows (the rows of whole documents): per document and list or object
    question, its records in page order, numbered from 0 across the pages (``item``); one row per field.
    (A repeated header row never gets here: actors/answering.py leaves it out of the page's records.)"""
    wanted = ["document", "page_number", "question_id", "items", "run_id", "config_fingerprint"]
    present = rows.select(wanted).filter(pc.greater(pc.list_value_length(rows["items"]), 0))
    out: list[dict[str, Any]] = []
    counters: dict[tuple[str, str], int] = {}
    ordered = sorted(present.to_pylist(), key=lambda row: (row["document"], row["question_id"], row["page_number"]))
    for row in ordered:
        key = (row["document"], row["question_id"])
        for record in _records_of(row["items"]):
            item = counters.get(key, 0)
            counters[key] = item + 1
            for entry in record:
                out.append(
                    {
                        "document": row["document"],
                        "page_number": row["page_number"],
                        "question_id": row["question_id"],
                        "item": item,
                        **{name: entry[name] for name in ITEM_VALUE_COLUMNS},
                        "run_id": row["run_id"],
                        "config_fingerprint": row["config_fingerprint"],
                    }
                )
    return pa.Table.from_pylist(out, schema=ITEM_SCHEMA)


ITEM_VALUE_COLUMNS = (
    "field",
    "answer",
    "value_number",
    "value_currency",
    "value_date",
    "value_boolean",
    "value_status",
    "evidence",
    "evidence_text",
    "evidence_bbox",
)


def _records_of(entries: Iterable[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """A row's field entries grouped by the record they belong to, in order."""
    records: dict[int, list[dict[str, Any]]] = {}
    for entry in entries:
        records.setdefault(entry["record"], []).append(entry)
    return [records[index] for index in sorted(records)]
