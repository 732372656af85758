"""The answering stage: pages in, answer rows out. ``PageAnswerer`` is what the batch actor (``AnswerPages``,
the actor pool's class) and the Serve deployment share; it talks to the model only through the adapter
interface (``actors.adapters``).

Each question of a page is answered by the model or from the page's text layer, as the rendering stage
decided (``Page.by_model``); then typed (``type``: pipeline/values.py) and looked up in the page's words
(its evidence: pipeline/text_layer.py). A list or object answer is read into its records
(pipeline/structured.py), and each field of each record is typed and looked up on its own. A page that
failed upstream becomes rows that say why. If the model fails on a batch, each page is retried alone so one
bad page cannot fail its neighbours; a page that still fails gets ``model_error``."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from actors.checkpoint import CheckpointInfo
from pipeline.config import JobConfig
from pipeline.fingerprints import config_fingerprint
from pipeline.images import unpack_images
from pipeline.questions import QuestionTemplate
from pipeline.record_schema import from_table
from pipeline.records import DOCUMENT, IDENTITY, AnswerRow, Page, Status, file_name_of, rows_to_table
from pipeline.structured import TRUNCATED, RecordField, closed_list, is_header, read_records
from pipeline.text_layer import NO_EVIDENCE_COLUMNS, TEXT_LAYER, find_evidence
from pipeline.values import PARSED, UNPARSED, ValueParser

MODEL = "model"  # answer_source of an answer the model gave

Templates = dict[str, QuestionTemplate]  # the questions asked, by id; a page names the ones it gets


def answer_rows(page: Page, questions: list[QuestionTemplate], **fields: Any) -> list[AnswerRow]:
    """A page's rows: one per question (its text filled in), or the single row of a document that failed as
    a whole. ``fields`` sets the rest (run, model, answer columns)."""
    values = {name: getattr(page, name) for name in IDENTITY}
    values |= {name: getattr(page, name) for name in ("document_rows", "repaired", "page_number", "num_pages")}
    values |= {name: getattr(page, name) for name in ("text_layer_chars", "status", "error", "render_ms", "scope")}
    values |= {name: getattr(page, name) for name in ("source_format", "page_dpi", "text_source")}
    values |= fields
    if page.scope == DOCUMENT:
        return [AnswerRow(**values)]
    file_name = file_name_of(page.document)
    return [
        AnswerRow(
            **values,
            question_id=question.id,
            question=question.question(file_name, page.page_number, page.num_pages),
        )
        for question in questions
    ]


def _set(row: AnswerRow, values: dict[str, Any]) -> None:
    for name, value in values.items():
        setattr(row, name, value)


class PageAnswerer:
    """Answer rows for pages, each asked the questions its ``question_ids`` name (see the module's docstring)."""

    def __init__(self, config: JobConfig, checkpoint: CheckpointInfo | None, run_id: str) -> None:
        self.model_config = config.model
        self.run_id = run_id
        self.fingerprint = config_fingerprint(config)
        self.adapter = None
        if config.model_answers:  # else no model, and no torch: a text-only run answers from the pages' text
            assert checkpoint is not None
            from actors.adapters import resolve_device
            from actors.families import load_adapter

            device = resolve_device(config.actors.num_gpus_per_actor)
            self.adapter = load_adapter(config.model, checkpoint.model_type, checkpoint.geometry, device)
        self.values = ValueParser(config.values)

    def _rows(self, page: Page, templates: Templates, **fields: Any) -> list[AnswerRow]:
        """The page's row for each of its questions, question text filled in."""
        return answer_rows(
            page,
            [templates[question_id] for question_id in page.question_ids],
            run_id=self.run_id,
            config_fingerprint=self.fingerprint,
            model_id=self.model_config.id,
            model_revision=self.model_config.revision,
            **fields,
        )

    def _answered(self, pages: list[Page], templates: list[Templates]) -> list[list[AnswerRow]]:
        """Each page's rows answered (by the model, or from the page's text layer), typed, with evidence."""
        images, prompts, rows, by_model = [], [], [], []
        for page, asked in zip(pages, templates, strict=True):
            page_rows = self._rows(page, asked)
            rows.append(page_rows)
            model_rows = []
            for row, model in zip(page_rows, page.by_model, strict=True):
                if model:
                    model_rows.append(row)
                else:
                    _set(row, {"answer": page.text, "answer_source": page.text_source or TEXT_LAYER})
            if model_rows:
                images.append(unpack_images(page.sub_images, page.sub_image_shapes))
            for row in model_rows:
                template = asked[row.question_id]
                prompts.append((len(images) - 1, row.question, template))
                by_model.append(row)
        for row, answer in zip(by_model, self._model_answers(images, prompts), strict=True):
            _set(
                row,
                {
                    "answer": answer.text,
                    "answer_source": MODEL,
                    "confidence": answer.confidence,
                    "generated_tokens": answer.generated_tokens,
                    "model_ms": answer.model_ms,
                },
            )
        for page, asked, page_rows in zip(pages, templates, rows, strict=True):
            for row in page_rows:
                template = asked[row.question_id]
                if template.has_records:
                    _set(row, self._records(template, row.answer, page))
                    continue
                _set(row, self.values.parse(template, row.answer))
                _set(row, self._evidence(template, row.answer, page))
        return rows

    def _model_answers(self, images: list, asked: list[tuple[int, str, QuestionTemplate]]) -> list:
        """The model's answers to ``asked`` (the image each is about, the question's text, its template)."""
        if not asked:
            return []
        from actors.adapters import Prompt

        assert self.adapter is not None  # a question the model may answer loads it (``model_answers``)
        prompts = [
            Prompt(image, self.adapter.prompt(question), template.answer_tokens, template.constraint)
            for image, question, template in asked
        ]
        return self.adapter.answer(images, prompts)

    @staticmethod
    def _evidence(typed: QuestionTemplate | RecordField, answer: str | None, page: Page) -> dict[str, Any]:
        """Where ``answer`` (to a question, or a record's field) is among the page's words. A label (yes,
        invoice) printed somewhere on the page is no evidence for it."""
        words = [] if typed.allowed_answers else page.words
        return find_evidence(answer, words, page.word_boxes, page.text_source or TEXT_LAYER)

    def _records(self, template: QuestionTemplate, answer: str | None, page: Page) -> dict[str, Any]:
        """A list or object answer's columns: its records field by field (``items``: each value typed and
        looked up on the page; a record that is the table's header row repeated, left out), and whether it
        was read whole (``parsed``), cut by max_new_tokens (``truncated``: a list's complete records kept, and
        its answer closed after them, so that it stays JSON; a cut object has none) or not JSON
        (``unparsed``: the answer as written)."""
        fields = template.fields or []
        many = template.type == "list"
        records, problem = read_records(answer, many)
        kept = [record for record in records if not is_header(record, fields)]
        entries = []
        for number, record in enumerate(kept):
            for field in fields:
                value = record.get(field.name)
                text = None if value is None else str(value)
                entry = {"record": number, "field": field.name, "answer": text, **self.values.parse(field, text)}
                entry.pop("error", None)
                entries.append(entry | self._evidence(field, text, page))
        columns: dict[str, Any] = {"items": entries, "value_status": PARSED, "error": None}
        if problem is not None:
            cut = problem.startswith(TRUNCATED)
            columns["value_status"] = TRUNCATED if cut else UNPARSED
            columns["error"] = f"{template.type} answer {problem}; {len(kept)} complete record(s) kept"
            if cut:
                columns["answer"] = closed_list(records) if many else None
        # The answer as a whole has no single place on the page: each field has its own (``items``).
        return columns | dict.fromkeys(NO_EVIDENCE_COLUMNS)

    def rows(self, pages: list[Page], templates: list[Templates]) -> list[list[AnswerRow]]:
        """For each page and the templates it may name: that page's answer rows."""
        out: list[list[AnswerRow]] = [[] for _ in pages]
        ok = [i for i, page in enumerate(pages) if page.status == Status.OK]
        for i, page in enumerate(pages):
            if page.status != Status.OK:
                out[i] = self._rows(page, templates[i])
        if not ok:
            return out
        try:
            answered = self._answered([pages[i] for i in ok], [templates[i] for i in ok])
            for i, page_rows in zip(ok, answered, strict=True):
                out[i] = page_rows
        except Exception:  # noqa: BLE001 - isolate the failing page(s), below
            for i in ok:
                try:
                    [out[i]] = self._answered([pages[i]], [templates[i]])
                except Exception as error:  # noqa: BLE001 - recorded on the page's rows
                    reason = f"model failed on this page: {type(error).__name__}: {error}"[:2000]
                    out[i] = self._rows(pages[i], templates[i], status=Status.MODEL_ERROR.value, error=reason)
        return out


class AnswerPages:
    """The answering stage: the actor of the ``map_batches`` operator on the actor pool (a block of pages in,
    their answer rows out)."""

    def __init__(self, config: JobConfig, checkpoint: CheckpointInfo | None, run_id: str) -> None:
        self.templates = {question.id: question for question in config.questions}
        self.answerer = PageAnswerer(config, checkpoint, run_id)

    def __call__(self, batch: pa.Table) -> pa.Table:
        pages = from_table(batch, Page)
        rows = self.answerer.rows(pages, [self.templates] * len(pages))
        return rows_to_table([row for page_rows in rows for row in page_rows])


_TEXT_ANSWERERS: dict[str, AnswerPages] = {}  # per run id: one in each worker process, made at its first block


def answer_from_text(pages: pa.Table, config: JobConfig, run_id: str) -> pa.Table:
    """The answering stage of a run whose questions are all answered from the pages' text (no model is
    loaded): a function, not an actor, so that Ray Data fuses it into the render task that read the pages."""
    if run_id not in _TEXT_ANSWERERS:
        _TEXT_ANSWERERS[run_id] = AnswerPages(config, None, run_id)
    return _TEXT_ANSWERERS[run_id](pages)
