"""§5(a) answers equal the naive single-sample generate; §5(c) the vision encoder runs once per page."""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from actors.idefics2 import Idefics2Engine, Prompt
from jobs.samples import PAGE_SIZES, invoice_pdf
from pipeline.config import ModelConfig, QuestionTemplate, RenderConfig
from pipeline.images import resolve_image_geometry, split_page
from pipeline.rasterize import open_pdf
from tests.reference import chat_prompt, reference_answer

QUESTIONS = [
    QuestionTemplate(id="number", text="What is the invoice number?", max_new_tokens=6),
    QuestionTemplate(id="total", text="What is the total due on page {page_number}?", max_new_tokens=12),
    QuestionTemplate(id="text", text="Transcribe the page.", max_new_tokens=20),
]


@pytest.fixture(scope="module")
def pages(tiny_model: Path) -> list[np.ndarray]:
    geometry = resolve_image_geometry(ModelConfig(id=str(tiny_model)), RenderConfig())
    rendered = []
    for number, size in enumerate(PAGE_SIZES.values()):
        document = open_pdf(invoice_pdf(number, 1, size), "pymupdf")
        rendered.append(document.render(1, geometry.render_longest_edge))
    return rendered


@pytest.mark.parametrize("splitting", [True, False])
def test_answers_equal_single_sample_generate(tiny_model: Path, pages: list[np.ndarray], splitting: bool) -> None:
    model_config = ModelConfig(id=str(tiny_model), dtype="float32")
    geometry = resolve_image_geometry(model_config, RenderConfig(image_splitting=splitting))
    engine = Idefics2Engine(model_config, geometry, torch.device("cpu"))
    prompts, expected_questions = [], []
    for page_index in range(len(pages)):
        for template in QUESTIONS:
            question = template.question("inv.pdf", page_index + 1, len(pages))
            prompts.append(Prompt(page_index, template.prompt(question), template.max_new_tokens))
            expected_questions.append((page_index, question, template.max_new_tokens))
    answers = engine.answer([split_page(page, geometry) for page in pages], prompts)

    processor = AutoProcessor.from_pretrained(tiny_model)
    processor.image_processor.do_image_splitting = splitting
    model = AutoModelForImageTextToText.from_pretrained(tiny_model, dtype=torch.float32).eval()
    by_question: dict[int, set[str]] = {}
    for answer, (page_index, question, max_new_tokens) in zip(answers, expected_questions, strict=True):
        text, length = reference_answer(
            processor, model, pages[page_index], chat_prompt(processor, question), max_new_tokens
        )
        assert (answer.text, answer.generated_tokens) == (text, length)
        assert 0.0 < answer.confidence <= 1.0 and answer.model_ms > 0
        by_question.setdefault(max_new_tokens, set()).add(text)
    # The tiny model's answers depend on the page, so a mix-up of image features would be caught.
    assert sum(len(texts) > 1 for texts in by_question.values()) >= 2


def test_vision_encoder_runs_once_per_page(tiny_model: Path, pages: list[np.ndarray]) -> None:
    model_config = ModelConfig(id=str(tiny_model), dtype="float32")
    geometry = resolve_image_geometry(model_config, RenderConfig())
    engine = Idefics2Engine(model_config, geometry, torch.device("cpu"))
    images_encoded: list[int] = []
    engine.model.model.vision_model.register_forward_hook(
        lambda module, args, kwargs, output: images_encoded.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    prompts = [
        Prompt(page_index, template.prompt(template.question("f", 1, 1)), template.max_new_tokens)
        for page_index in range(len(pages))
        for template in QUESTIONS
    ]
    answers = engine.answer([split_page(page, geometry) for page in pages], prompts)
    assert len(answers) == 3 * len(pages)
    # One encoder call for the batch; 5 sub-images per page (4 crops + the page), not 5 per question.
    assert images_encoded == [5 * len(pages)]
