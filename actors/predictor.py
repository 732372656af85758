"""Pages in, output rows out: the code the batch actor (``PagePredictor``) and the Serve deployment share.
It talks to the model only through the adapter interface (``actors.adapters``)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from actors.adapters import Prompt, resolve_device
from actors.families import load_adapter
from pipeline.config import JobConfig, QuestionTemplate
from pipeline.images import ImageGeometry, unpack_images
from pipeline.rows import Status, output_rows, rows_to_table
from pipeline.text_layer import TEXT_LAYER, find_evidence
from pipeline.values import ValueParser

MODEL = "model"  # answer_source of an answer the model gave

Templates = dict[str, QuestionTemplate]  # the questions asked, by id; a page row names the ones it gets


class PageAnswerer:
    """Output rows (OUTPUT_SCHEMA) for split page rows, each asked the questions its ``question_ids`` name.

    Rows that already failed upstream become error rows. If the model fails on a batch, each page is
    retried alone so one bad page cannot fail its neighbours; pages that still fail get model_error."""

    def __init__(self, config: JobConfig, geometry: ImageGeometry, run_id: str) -> None:
        self.model_config = config.model
        self.run_id = run_id
        self.fingerprint = config.fingerprint()
        self.adapter = load_adapter(config.model, geometry, resolve_device(config.actors.num_gpus_per_actor))
        self.values = ValueParser(config.values)

    def _rows(self, page: dict[str, Any], templates: Templates, **fields: Any) -> list[dict[str, Any]]:
        """The page's row for each of its questions, question text filled in."""
        return output_rows(
            page,
            [templates[question_id] for question_id in page["question_ids"]],
            run_id=self.run_id,
            config_fingerprint=self.fingerprint,
            model_id=self.model_config.id,
            model_revision=self.model_config.revision,
            **fields,
        )

    def _answered(self, pages: list[dict[str, Any]], templates: list[Templates]) -> list[list[dict]]:
        """Each page's rows answered: by the model, or from the page's text layer (``source``), then typed
        (``type``) and looked up in the text layer (evidence)."""
        images, prompts, rows, by_model = [], [], [], []
        for page, asked in zip(pages, templates, strict=True):
            page_rows = self._rows(page, asked)
            rows.append(page_rows)
            model_rows = []
            for row in page_rows:
                if asked[row["question_id"]].answered_by_model(page["text_usable"]):
                    model_rows.append(row)
                else:
                    row.update(answer=page["text"], answer_source=TEXT_LAYER)
            if model_rows:
                images.append(unpack_images(page["sub_images"], page["sub_image_shapes"]))
            for row in model_rows:
                template = asked[row["question_id"]]
                prompt = self.adapter.prompt(row["question"])
                prompts.append(Prompt(len(images) - 1, prompt, template.answer_tokens, template.constraint))
                by_model.append(row)
        for row, answer in zip(by_model, self.adapter.answer(images, prompts), strict=True):
            row.update(
                answer=answer.text,
                answer_source=MODEL,
                confidence=answer.confidence,
                generated_tokens=answer.generated_tokens,
                model_ms=answer.model_ms,
            )
        for page, asked, page_rows in zip(pages, templates, rows, strict=True):
            for row in page_rows:
                template = asked[row["question_id"]]
                row.update(self.values.parse(template, row["answer"]))
                # A label (yes, invoice) printed somewhere on the page is no evidence for it.
                words = [] if template.allowed_answers else page["words"]
                row.update(find_evidence(row["answer"], words, page["word_boxes"]))
        return rows

    def rows(self, pages: list[dict[str, Any]], templates: list[Templates]) -> list[list[dict[str, Any]]]:
        """For each split page row and the templates it may name: that page's output rows."""
        out: list[list[dict[str, Any]]] = [[] for _ in pages]
        ok = [i for i, page in enumerate(pages) if page["status"] == Status.OK]
        for i, page in enumerate(pages):
            if page["status"] != Status.OK:
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


class PagePredictor:
    """The actor of the ``map_batches`` operator on the actor pool (pyarrow batches of split pages in, output
    rows out)."""

    def __init__(self, config: JobConfig, geometry: ImageGeometry, run_id: str) -> None:
        self.templates = {question.id: question for question in config.questions}
        self.answerer = PageAnswerer(config, geometry, run_id)

    def __call__(self, batch: pa.Table) -> pa.Table:
        pages = batch.to_pylist()
        rows = self.answerer.rows(pages, [self.templates] * len(pages))
        return rows_to_table([row for page_rows in rows for row in page_rows])
