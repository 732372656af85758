"""Pages in, output rows out: the code the batch actor (``PagePredictor``) and the Serve deployment share.
It talks to the model only through the adapter interface (``actors.adapters``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from actors.adapters import Prompt, resolve_device
from actors.families import load_adapter
from pipeline.config import JobConfig, QuestionTemplate
from pipeline.documents import file_name_of
from pipeline.images import ImageGeometry, unpack_images
from pipeline.rows import Status, rows_to_table


class PageAnswerer:
    """Output rows (OUTPUT_SCHEMA) for split page rows and the questions asked of each page.

    Rows that already failed upstream become error rows. If the model fails on a batch, each page is
    retried alone so one bad page cannot fail its neighbours; pages that still fail get model_error."""

    def __init__(self, config: JobConfig, geometry: ImageGeometry, run_id: str) -> None:
        self.model_config = config.model
        self.run_id = run_id
        self.fingerprint = config.fingerprint()
        self.adapter = load_adapter(config.model, geometry, resolve_device(config.actors.num_gpus_per_actor))

    def _base(self, page: dict[str, Any], **fields: Any) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "document": page["uri"],
            "source_version": page["source_version"] or None,
            "config_fingerprint": self.fingerprint,
            "document_rows": int(page["document_rows"]),
            "file_size": int(page["file_size"]),
            "etag": page["etag"] or None,
            "version_id": page["version_id"] or None,
            "sha256": page["sha256"] or None,
            "repaired": bool(page["repaired"]),
            "page_number": int(page["page_number"]) or None,
            "num_pages": int(page["num_pages"]) or None,
            "model_id": self.model_config.id,
            "model_revision": self.model_config.revision,
            "status": page["status"],
            "error": page["error"] or None,
            "render_ms": float(page["render_ms"]) or None,
            **fields,
        }

    def _question_rows(
        self, page: dict[str, Any], questions: list[QuestionTemplate], **fields: Any
    ) -> list[dict[str, Any]]:
        """The page's row for each of its questions, question text filled in. A failed document (no page
        number) is a single row."""
        base = self._base(page, **fields)
        if base["page_number"] is None:
            return [base]
        file_name = file_name_of(base["document"])
        return [
            {
                **base,
                "question_id": template.id,
                "question": template.question(file_name, base["page_number"], base["num_pages"]),
            }
            for template in questions
        ]

    def _answered(self, pages: list[dict[str, Any]], questions: list[list[QuestionTemplate]]) -> list[list[dict]]:
        images, prompts, rows = [], [], []
        for slot, (page, templates) in enumerate(zip(pages, questions, strict=True)):
            images.append(unpack_images(page["sub_images"], page["sub_image_shapes"]))
            page_rows = self._question_rows(page, templates)
            rows.append(page_rows)
            for template, row in zip(templates, page_rows, strict=True):
                prompts.append(Prompt(slot, self.adapter.prompt(row["question"]), template.max_new_tokens))
        answers = iter(self.adapter.answer(images, prompts))
        for page_rows in rows:
            for row in page_rows:
                answer = next(answers)
                row.update(
                    answer=answer.text,
                    confidence=answer.confidence,
                    generated_tokens=answer.generated_tokens,
                    model_ms=answer.model_ms,
                )
        return rows

    def rows(self, pages: list[dict[str, Any]], questions: list[list[QuestionTemplate]]) -> list[list[dict[str, Any]]]:
        """For each page (a row of the split stage) and its questions: that page's output rows."""
        out: list[list[dict[str, Any]]] = [[] for _ in pages]
        ok = [i for i, page in enumerate(pages) if page["status"] == Status.OK]
        for i, page in enumerate(pages):
            if page["status"] != Status.OK:
                out[i] = self._question_rows(page, questions[i])
        if not ok:
            return out
        try:
            answered = self._answered([pages[i] for i in ok], [questions[i] for i in ok])
            for i, page_rows in zip(ok, answered, strict=True):
                out[i] = page_rows
        except Exception:  # noqa: BLE001 - isolate the failing page(s), below
            for i in ok:
                try:
                    [out[i]] = self._answered([pages[i]], [questions[i]])
                except Exception as error:  # noqa: BLE001 - recorded on the page's rows
                    reason = f"model failed on this page: {type(error).__name__}: {error}"[:2000]
                    out[i] = self._question_rows(pages[i], questions[i], status=Status.MODEL_ERROR.value, error=reason)
        return out


class PagePredictor:
    """Ray Data actor (map_batches with ActorPoolStrategy): a batch of split page rows in, output rows out."""

    def __init__(self, config: JobConfig, geometry: ImageGeometry, run_id: str) -> None:
        self.config = config
        self.answerer = PageAnswerer(config, geometry, run_id)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        pages = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        questions = [
            self.config.questions_for_page(int(page["page_number"]), int(page["num_pages"]))
            if int(page["page_number"])
            else []
            for page in pages
        ]
        return rows_to_table([row for page_rows in self.answerer.rows(pages, questions) for row in page_rows])
