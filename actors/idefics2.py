"""The Idefics2 actor: loads processor and model once, encodes each page once, answers all its questions.

``Idefics2Engine`` holds the model logic and is usable without Ray (tests, benchmarks); ``Idefics2Predictor``
is the Ray Data callable class that turns a batch of page rows into output rows.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import JobConfig, ModelConfig, QuestionTemplate
from pipeline.documents import file_name_of
from pipeline.images import ImageGeometry, ModelLoadError, PixelNormalizer, model_load_hint, unpack_images
from pipeline.rows import Status, rows_to_table

END_OF_UTTERANCE = "<end_of_utterance>"


@dataclass(frozen=True)
class Answer:
    text: str
    generated_tokens: int  # tokens generated for this answer, the stop token included
    confidence: float  # mean probability of the generated tokens under the model
    model_ms: float  # this page's share of image encoding plus the wall time of the generate call


@dataclass(frozen=True)
class Prompt:
    page: int  # index of the page in the batch
    text: str
    max_new_tokens: int


def resolve_device(num_gpus: float) -> torch.device:
    return torch.device("cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class Idefics2Engine:
    """Idefics2 inference over pages that are already split into uint8 sub-images."""

    def __init__(self, model: ModelConfig, geometry: ImageGeometry, device: torch.device) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(model.id, revision=model.revision)
            self.model = AutoModelForImageTextToText.from_pretrained(
                model.id,
                revision=model.revision,
                dtype=resolve_dtype(model.dtype, device),
                attn_implementation=model.attn_implementation,
            )
        except Exception as error:
            raise ModelLoadError(model_load_hint(model.id, error)) from error
        self.model.to(device).eval()
        self.device = device
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        # The prompt text expands <image> into 5 or 1 image blocks; it must agree with our split stage.
        self.processor.image_processor.do_image_splitting = geometry.splitting
        self.normalizer = PixelNormalizer(geometry)
        self.stop_token_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.inference_mode()
    def encode_pages(self, pages: list[list[np.ndarray]]) -> list[torch.Tensor]:
        """Vision encoder + perceiver, once per page: (sub-images * latents, hidden) features per page."""
        values, mask = self.normalizer.batch(pages)
        output = self.model.model.get_image_features(
            pixel_values=torch.from_numpy(values).to(self.device),
            pixel_attention_mask=torch.from_numpy(mask).to(self.device),
        )
        return list(output.pooler_output)

    @torch.inference_mode()
    def generate(self, prompts: list[str], features: list[torch.Tensor], max_new_tokens: int) -> list[Answer]:
        """Greedy, left-padded batched generation from precomputed image features; decodes new tokens only."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        started = time.perf_counter()
        inputs = self.processor(text=prompts, padding=True, return_tensors="pt").to(self.device)
        output = self.model.generate(
            **inputs,
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)},
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.stop_token_ids,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
        elapsed_ms = (time.perf_counter() - started) * 1000
        new_tokens = output.sequences[:, inputs["input_ids"].shape[1] :]
        step_logits = torch.stack(output.logits, dim=1).float()  # (batch, steps, vocab)
        token_probs = step_logits.softmax(-1).gather(-1, new_tokens[:, :, None]).squeeze(-1).cpu()
        answers = []
        for row, tokens in enumerate(new_tokens.cpu().tolist()):
            length = next((i + 1 for i, token in enumerate(tokens) if token in self.stop_token_ids), len(tokens))
            text = self.processor.tokenizer.decode(tokens[:length], skip_special_tokens=True).strip()
            confidence = float(token_probs[row, :length].mean())
            answers.append(Answer(text, length, confidence, elapsed_ms))
        return answers

    def answer(self, pages: list[list[np.ndarray]], prompts: list[Prompt]) -> list[Answer]:
        """Answer every prompt (in order) about its page; each page goes through the vision encoder once."""
        started = time.perf_counter()
        features = self.encode_pages(pages)
        encode_ms_per_page = (time.perf_counter() - started) * 1000 / max(len(pages), 1)
        by_length: dict[int, list[int]] = defaultdict(list)
        for index, prompt in enumerate(prompts):
            by_length[prompt.max_new_tokens].append(index)
        answers: list[Answer | None] = [None] * len(prompts)
        for max_new_tokens, indices in by_length.items():
            group = self.generate(
                [prompts[i].text for i in indices], [features[prompts[i].page] for i in indices], max_new_tokens
            )
            for index, answer in zip(indices, group, strict=True):
                answers[index] = Answer(
                    answer.text, answer.generated_tokens, answer.confidence, answer.model_ms + encode_ms_per_page
                )
        return [answer for answer in answers if answer is not None]


class Idefics2Predictor:
    """Ray Data actor (map_batches with ActorPoolStrategy): page rows in, output rows (OUTPUT_SCHEMA) out.

    Rows that already failed upstream pass through as error rows. If the model fails on a batch, each
    page is retried alone so one bad page cannot fail its neighbours; pages that still fail get model_error.
    """

    def __init__(self, config: JobConfig, geometry: ImageGeometry, run_id: str) -> None:
        self.config = config
        self.run_id = run_id
        self.fingerprint = config.fingerprint()
        self.engine = Idefics2Engine(config.model, geometry, resolve_device(config.actors.num_gpus_per_actor))

    def _base(self, batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "document": batch["uri"][i],
            "source_version": batch["source_version"][i] or None,
            "config_fingerprint": self.fingerprint,
            "document_rows": int(batch["document_rows"][i]),
            "file_size": int(batch["file_size"][i]),
            "etag": batch["etag"][i] or None,
            "version_id": batch["version_id"][i] or None,
            "sha256": batch["sha256"][i] or None,
            "repaired": bool(batch["repaired"][i]),
            "page_number": int(batch["page_number"][i]) or None,
            "num_pages": int(batch["num_pages"][i]) or None,
            "model_id": self.config.model.id,
            "model_revision": self.config.model.revision,
            "status": batch["status"][i],
            "error": batch["error"][i] or None,
            "render_ms": float(batch["render_ms"][i]) or None,
        }

    def _page_questions(
        self, batch: dict[str, np.ndarray], i: int, **fields: Any
    ) -> list[tuple[QuestionTemplate, dict[str, Any]]]:
        """Each question that applies to page ``i``, with the page's row for it (question text filled in)."""
        base = {**self._base(batch, i), **fields}
        file_name = file_name_of(base["document"])
        return [
            (
                template,
                {
                    **base,
                    "question_id": template.id,
                    "question": template.question(file_name, base["page_number"], base["num_pages"]),
                },
            )
            for template in self.config.questions_for_page(base["page_number"], base["num_pages"])
        ]

    def _error_rows(self, batch: dict[str, np.ndarray], i: int, **fields: Any) -> list[dict[str, Any]]:
        """A failed document is one row; a failed page is one row per question that applies to it."""
        if not int(batch["page_number"][i]):
            return [{**self._base(batch, i), **fields}]
        return [row for _, row in self._page_questions(batch, i, **fields)]

    def _answer_rows(self, batch: dict[str, np.ndarray], page_indices: list[int]) -> list[dict[str, Any]]:
        pages, prompts, rows = [], [], []
        for slot, i in enumerate(page_indices):
            pages.append(unpack_images(batch["sub_images"][i], batch["sub_image_shapes"][i]))
            for template, row in self._page_questions(batch, i):
                prompts.append(Prompt(slot, template.prompt(row["question"]), template.max_new_tokens))
                rows.append(row)
        answers = self.engine.answer(pages, prompts)
        for row, answer in zip(rows, answers, strict=True):
            row.update(
                answer=answer.text,
                confidence=answer.confidence,
                generated_tokens=answer.generated_tokens,
                model_ms=answer.model_ms,
            )
        return rows

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        size = len(batch["uri"])
        ok = [i for i in range(size) if batch["status"][i] == Status.OK]
        rows = [row for i in range(size) if batch["status"][i] != Status.OK for row in self._error_rows(batch, i)]
        if not ok:
            return rows_to_table(rows)
        try:
            rows += self._answer_rows(batch, ok)
        except Exception:  # noqa: BLE001 - isolate the failing page(s), below
            for i in ok:
                try:
                    rows += self._answer_rows(batch, [i])
                except Exception as error:  # noqa: BLE001 - recorded on the page's row
                    reason = f"model failed on this page: {type(error).__name__}: {error}"[:2000]
                    rows += self._error_rows(batch, i, status=Status.MODEL_ERROR.value, error=reason)
        return rows_to_table(rows)
