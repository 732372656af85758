"""A question template (``QuestionTemplate``; the fields of a list or object question's records are
pipeline/structured.py's ``RecordField``), a config's list of templates (``QuestionList``: ids unique, none
taking a column name of the documents view), and which pages each applies to."""

from __future__ import annotations

import json
import string
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.grammars import BOOLEAN_ANSWERS, Constraint, check_choices, choice_grammar, form_grammar
from pipeline.pages import PageRange, parse_page_selection, selection_contains
from pipeline.structured import RecordField, record_prompt, record_schema

TEMPLATE_VARIABLES = ("file_name", "page_number", "num_pages")
RECORD_TYPES = ("object", "list")


class QuestionTemplate(BaseModel):
    """One question asked of every page it applies to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Alias of the question; a column name in tables.")
    text: str = Field(min_length=1, description="Question, may use {file_name}, {page_number}, {num_pages}.")
    pages: str | int | list[str | int] = Field("all", description='all, first, last, or ranges such as "1-3,-1".')
    max_new_tokens: int = Field(64, ge=1, le=8192, description="Most tokens of one answer.")
    type: Literal["text", "number", "money", "date", "boolean", "choice", "object", "list"] = Field(
        "text",
        description="What the answer is: text (as generated), number, money (amount and ISO 4217 currency), "
        "date, boolean (yes/no), or choice (one of `choices`), parsed into the value_* columns; or records of "
        "`fields`: object (one record per page) or list (zero or more per page, such as line items), decoded as "
        "JSON under their schema, each field typed and boxed in the `items` table.",
    )
    fields: list[RecordField] | None = Field(
        None, description="With type object or list: the fields of each record, in order (names unique)."
    )
    max_items: int = Field(
        200, ge=1, le=10_000, description="With type list: the most records one page's answer holds."
    )
    choices: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="With type choice: the allowed answers (at least two, distinct)."
    )
    constrained: bool | None = Field(
        None,
        description="Decode only answers of the type's form (a grammar masks the other tokens): always on for "
        "choice and boolean; number, money and date may opt in; null: on for choice and boolean.",
    )
    source: Literal["model", "text_layer", "auto"] = Field(
        "model",
        description="Where the answer comes from: the model; the page's own text layer (type text only); or "
        "auto: the text layer when the page has a usable one (text_layer section), else the model.",
    )
    reduce: Literal["first", "last", "max_confidence", "all"] = Field(
        "first",
        description="The document-level answer (`docqa table`, the `documents` view): the first or last page's "
        "answer, the most confident one, or all of them in page order.",
    )

    @field_validator("text")
    @classmethod
    def _known_variables(cls, text: str) -> str:
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
        except ValueError as error:
            raise ValueError(f"malformed template ({error}); write literal braces as {{{{ and }}}}") from None
        unknown = sorted({name for name in names if name not in TEMPLATE_VARIABLES})
        if unknown:
            raise ValueError(f"unknown template variable(s) {unknown}; known: {list(TEMPLATE_VARIABLES)}")
        return text

    @field_validator("pages")
    @classmethod
    def _valid_pages(cls, pages: str | int | list[str | int]) -> str | int | list[str | int]:
        parse_page_selection(pages)
        return pages

    @model_validator(mode="after")
    def _consistent_type(self) -> QuestionTemplate:
        check_choices(self.type, self.choices)
        if self.type in RECORD_TYPES:
            if not self.fields:
                raise ValueError(f"type {self.type} needs `fields`: the fields of its records")
            names = [field.name for field in self.fields]
            if len(set(names)) < len(names):
                raise ValueError(f"field names must be unique: {names}")
            if self.constrained is False:
                raise ValueError(f"type {self.type} is always decoded under its schema; leave `constrained` out")
        elif self.fields is not None:
            raise ValueError(f"`fields` is for type object or list, not type {self.type}")
        if self.constrained is False and self.type in ("choice", "boolean"):
            raise ValueError(f"type {self.type} is always constrained; leave `constrained` out")
        if self.constrained and self.type == "text":
            raise ValueError("type text has no form to constrain; set a type, or leave `constrained` out")
        if self.source != "model" and self.type != "text":
            raise ValueError(f"source {self.source} gives the page's text: type must be text, not {self.type}")
        return self

    def answered_by_model(self, text_usable: bool) -> bool:
        """Whether the model answers this question on a page whose text layer is (or is not) usable."""
        return self.source == "model" or (self.source == "auto" and not text_usable)

    @property
    def allowed_answers(self) -> list[str] | None:
        """The only answers a choice or boolean question can have."""
        return BOOLEAN_ANSWERS if self.type == "boolean" else self.choices

    @property
    def has_records(self) -> bool:
        """Whether the answers are records of fields (type object or list)."""
        return self.type in RECORD_TYPES

    @property
    def constraint(self) -> Constraint | None:
        """The grammar answers are decoded under (pipeline/grammars.py; the JSON Schema of
        pipeline/structured.py for records), or None."""
        if self.has_records:
            return "json_schema", json.dumps(record_schema(self))
        allowed = self.allowed_answers
        if allowed is not None:
            return choice_grammar(allowed)
        return form_grammar(self.type) if self.constrained else None

    @property
    def answer_tokens(self) -> int:
        """Most tokens an answer may take: ``max_new_tokens``, raised for a choice so that the longest allowed
        answer fits however it is tokenized (at most a token per byte) with a leading space and its stop token."""
        allowed = self.allowed_answers
        if allowed is None:
            return self.max_new_tokens
        return max(self.max_new_tokens, max(len(answer.encode()) for answer in allowed) + 2)

    @property
    def page_ranges(self) -> tuple[PageRange, ...]:
        return parse_page_selection(self.pages)

    def applies_to(self, page_number: int, num_pages: int) -> bool:
        return selection_contains(self.page_ranges, page_number, num_pages)

    def question(self, file_name: str, page_number: int, num_pages: int) -> str:
        """The question as the model is asked it: the text with its variables filled in, and for records what
        to answer with (pipeline/structured.py ``record_prompt``)."""
        text = self.text.format(file_name=file_name, page_number=page_number, num_pages=num_pages)
        if self.has_records:
            return record_prompt(self, text)
        return text


# Columns of the documents view (`docqa table`) beside each question's own, ID_value, ID_currency, ID_page.
DOCUMENT_COLUMNS = ("document", "num_pages", "status")
DERIVED_SUFFIXES = ("_value", "_currency", "_page", "_review")


def check_unique_ids(questions: list[QuestionTemplate]) -> list[QuestionTemplate]:
    ids = [question.id for question in questions]
    duplicates = sorted({qid for qid in ids if ids.count(qid) > 1})
    if duplicates:
        raise ValueError(f"question ids must be unique; repeated: {duplicates}")
    taken = {*DOCUMENT_COLUMNS, *(qid + suffix for qid in ids for suffix in DERIVED_SUFFIXES)}
    clashing = sorted(set(ids) & taken)
    if clashing:
        raise ValueError(
            f"question ids {clashing} clash with columns of the documents view (document, num_pages, status, and "
            "per question ID: ID_value, ID_currency, ID_page)"
        )
    return questions


QuestionList = Annotated[list[QuestionTemplate], Field(min_length=1), AfterValidator(check_unique_ids)]
