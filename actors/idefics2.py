"""The Idefics2 actor: loads processor and model once, encodes each page once, answers all its questions.

``Idefics2Engine`` holds the model logic and is usable without Ray (tests, benchmarks); ``Idefics2Predictor``
is the Ray Data callable class that turns a batch of page rows into output rows.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import JobConfig, ModelConfig, QuestionTemplate
from pipeline.documents import file_name_of
from pipeline.images import ImageGeometry, ModelLoadError, PixelNormalizer, model_load_hint, unpack_images
from pipeline.rows import Status, rows_to_table

END_OF_UTTERANCE = "<end_of_utterance>"
Item = TypeVar("Item")
Output = TypeVar("Output")


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


def split_on_out_of_memory(run: Callable[[list[Item]], list[Output]], items: list[Item]) -> list[Output]:
    """``run(items)``; when the GPU runs out of memory, the same on each half, recursively, so a batch
    that does not fit is answered in smaller ones instead of failing (one item that does not fit raises)."""
    try:
        return run(items)
    except torch.OutOfMemoryError:
        if len(items) == 1:
            raise
        torch.cuda.empty_cache()
        middle = len(items) // 2
        return split_on_out_of_memory(run, items[:middle]) + split_on_out_of_memory(run, items[middle:])


class Idefics2Engine:
    """Idefics2 inference over pages that are already split into uint8 sub-images."""

    def __init__(self, model: Any, processor: Any, geometry: ImageGeometry) -> None:
        """From a loaded model and processor (the benchmarks build full-size models in memory);
        ``Idefics2Engine.load`` loads a checkpoint."""
        self.processor = processor
        self.model = model.eval()
        self.device = next(model.parameters()).device
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        # The prompt text expands <image> into 5 or 1 image blocks; it must agree with our split stage.
        self.processor.image_processor.do_image_splitting = geometry.splitting
        self.normalizer = PixelNormalizer(geometry)
        self.stop_token_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @classmethod
    def load(cls, model: ModelConfig, geometry: ImageGeometry, device: torch.device) -> Idefics2Engine:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(model.id, revision=model.revision)
            loaded = AutoModelForImageTextToText.from_pretrained(
                model.id,
                revision=model.revision,
                dtype=resolve_dtype(model.dtype, device),
                attn_implementation=model.attn_implementation,
            )
        except Exception as error:
            raise ModelLoadError(model_load_hint(model.id, error)) from error
        return cls(loaded.to(device), processor, geometry)

    @torch.inference_mode()
    def encode_pages(self, pages: list[list[np.ndarray]]) -> list[torch.Tensor]:
        """Vision encoder + perceiver, once per page: (sub-images * latents, hidden) features per page.

        Pages are encoded in groups of the same padded size: Idefics2 pads every image of a call to the
        largest, so a portrait page beside a landscape one would double the encoder's work."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, images in enumerate(pages):
            groups[max(image.shape[0] for image in images), max(image.shape[1] for image in images)].append(index)
        features: list[torch.Tensor | None] = [None] * len(pages)
        for indices in groups.values():
            encoded = split_on_out_of_memory(self._encode, [pages[i] for i in indices])
            for index, page_features in zip(indices, encoded, strict=True):
                features[index] = page_features
        return [page_features for page_features in features if page_features is not None]

    def _encode(self, pages: list[list[np.ndarray]]) -> list[torch.Tensor]:
        values, mask = self.normalizer.batch(pages)
        output = self.model.model.get_image_features(
            pixel_values=torch.from_numpy(values).to(self.device),
            pixel_attention_mask=torch.from_numpy(mask).to(self.device),
        )
        return list(output.pooler_output)

    @torch.inference_mode()
    def generate(
        self, prompts: list[str], features: list[torch.Tensor], max_new_tokens: int, fixed_length: bool = False
    ) -> list[Answer]:
        """Greedy, left-padded batched generation from precomputed image features; decodes new tokens only.
        ``fixed_length`` forces max_new_tokens tokens (benchmarks of random-weight models, which never stop)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        started = time.perf_counter()
        inputs = self.processor(text=prompts, padding=True, return_tensors="pt").to(self.device)
        output = self.model.generate(
            **inputs,
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)},
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if fixed_length else None,
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

    def answer(self, pages: list[list[np.ndarray]], prompts: list[Prompt], fixed_length: bool = False) -> list[Answer]:
        """Answer every prompt (in order) about its page; each page goes through the vision encoder once.
        Prompts with the same length cap share one generate call (split in halves if it runs out of memory)."""
        started = time.perf_counter()
        features = self.encode_pages(pages)
        encode_ms_per_page = (time.perf_counter() - started) * 1000 / max(len(pages), 1)
        by_length: dict[int, list[int]] = defaultdict(list)
        for index, prompt in enumerate(prompts):
            by_length[prompt.max_new_tokens].append(index)
        answers: list[Answer | None] = [None] * len(prompts)
        for max_new_tokens, indices in by_length.items():
            group = split_on_out_of_memory(
                lambda chunk, n=max_new_tokens: self.generate(
                    [prompts[i].text for i in chunk], [features[prompts[i].page] for i in chunk], n, fixed_length
                ),
                indices,
            )
            for index, answer in zip(indices, group, strict=True):
                answers[index] = Answer(
                    answer.text, answer.generated_tokens, answer.confidence, answer.model_ms + encode_ms_per_page
                )
        return [answer for answer in answers if answer is not None]


class PageAnswerer:
    """Output rows (OUTPUT_SCHEMA) for split page rows and the questions asked of each page: the code the
    batch actor and the Serve deployment share.

    Rows that already failed upstream become error rows. If the model fails on a batch, each page is
    retried alone so one bad page cannot fail its neighbours; pages that still fail get model_error."""

    def __init__(self, config: JobConfig, geometry: ImageGeometry, run_id: str) -> None:
        self.model_config = config.model
        self.run_id = run_id
        self.fingerprint = config.fingerprint()
        self.engine = Idefics2Engine.load(config.model, geometry, resolve_device(config.actors.num_gpus_per_actor))

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
                prompts.append(Prompt(slot, template.prompt(row["question"]), template.max_new_tokens))
        answers = iter(self.engine.answer(images, prompts))
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


class Idefics2Predictor:
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
