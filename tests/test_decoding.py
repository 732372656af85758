"""Continuous batching over a slot KV cache (actors/decoding.py) gives the answers of the naive single-sample
generate, whatever the slot count, the steps queued between two reads, and the moves of the cache."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from actors.adapters import Answer, Prompt
from actors.families import inspect_checkpoint, load_adapter
from bench.model_stage import sample_pages
from bench.naive import reference_answer
from pipeline.config import ModelConfig, RenderConfig
from pipeline.images import split_page
from pipeline.questions import QuestionTemplate
from pipeline.structured import TRUNCATED, read_records, record_schema

QUESTIONS = ["What is the invoice number?", "Total?", "Who is the customer named on this invoice, in full?"]
FIELDS = [
    {"name": "description", "type": "text"},
    {"name": "amount", "type": "money"},
    {"name": "paid", "type": "boolean"},
    {"name": "kind", "type": "choice", "choices": ["goods", "service"]},
]
# Typed questions decoded under their grammars, beside free ones in the same batch.
CONSTRAINED = [
    QuestionTemplate(id="paid", text="Is it paid?", type="boolean"),
    QuestionTemplate(id="kind", text="Kind?", type="choice", choices=["invoice", "receipt", "credit note"]),
    QuestionTemplate(id="total", text="Total?", type="money", constrained=True, max_new_tokens=12),
]
# Records under their JSON Schema: a list long enough to close, one cut by its token cap, an object.
RECORDS = [
    *[
        QuestionTemplate(id=f"items{cap}", text="Items?", type="list", fields=FIELDS, max_items=3, max_new_tokens=cap)
        for cap in (96, 24)
    ],
    QuestionTemplate(id="vendor", text="Vendor?", type="object", fields=FIELDS, max_new_tokens=80),
]


@pytest.fixture(scope="module")
def pages() -> list[np.ndarray]:
    return sample_pages(3, 896)


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> tuple[object, object]:
    processor = AutoProcessor.from_pretrained(tiny_model)
    return processor, AutoModelForImageTextToText.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.mark.parametrize(
    ("settings", "sync_steps", "repeats"),
    [
        ({"decode_slots": 1}, 1, 1),  # one answer at a time: every answer is its own admission
        ({"decode_slots": 2}, 8, 3),  # refills while others decode, eight steps per read, cache moved back
        ({"continuous_batching": False}, None, 1),  # transformers' generate
        ({"continuous_batching": False, "prefix_cache": False}, None, 1),
    ],
)
def test_answers_equal_single_sample_generate(
    tiny_model: Path,
    pages: list[np.ndarray],
    reference: tuple[object, object],
    settings: dict[str, object],
    sync_steps: int | None,
    repeats: int,
) -> None:
    model_config = ModelConfig(id=str(tiny_model), dtype="float32", **settings)
    geometry = inspect_checkpoint(model_config, RenderConfig()).geometry
    engine = load_adapter(model_config, "idefics2", geometry, torch.device("cpu"))
    assert (engine.decoder is not None) == (sync_steps is not None)
    if engine.decoder is not None:
        engine.decoder.sync_steps = sync_steps
    lengths = random.Random(0)
    prompts = [
        Prompt(page, engine.prompt(question), lengths.choice([5, 40, 60]))
        for _ in range(repeats)
        for page in range(len(pages))
        for question in QUESTIONS
    ]
    answers = engine.answer([split_page(page, geometry) for page in pages], prompts)

    processor, model = reference
    for answer, prompt in zip(answers, prompts, strict=True):
        expected = reference_answer(processor, model, pages[prompt.page], prompt.text, prompt.max_new_tokens)
        assert (answer.text, answer.generated_tokens) == expected
        assert 0.0 < answer.confidence <= 1.0
    # Some answers stop early at the end-of-answer token, others run to their length cap.
    assert {answer.generated_tokens for answer in answers} & {5, 40, 60}
    assert any(answer.generated_tokens < prompt.max_new_tokens for answer, prompt in zip(answers, prompts, strict=True))
    if engine.decoder is not None:
        stats = engine.decoder.stats
        slots = settings["decode_slots"]
        assert stats["prefills"] >= len(prompts) / slots  # admissions as slots free up, not one batch
        if sync_steps > 1:
            assert stats["moves"] >= 1, stats


def _answers_equal_generate(
    model_path: Path,
    settings: dict[str, object],
    questions: list[QuestionTemplate],
    pages: list[np.ndarray],
    reference: tuple[object, object],
) -> list[tuple[Answer, Prompt, QuestionTemplate]]:
    """Every question on every page, answered by our engine under ``settings``; each answer checked equal
    to transformers' generate under the same xgrammar logits processor."""
    model_config = ModelConfig(id=str(model_path), dtype="float32", **settings)
    geometry = inspect_checkpoint(model_config, RenderConfig()).geometry
    engine = load_adapter(model_config, "idefics2", geometry, torch.device("cpu"))
    prompts = [
        Prompt(page, engine.prompt(question.text), question.answer_tokens, question.constraint)
        for page in range(len(pages))
        for question in questions
    ]
    answers = engine.answer([split_page(page, geometry) for page in pages], prompts)
    processor, model = reference
    for answer, prompt, question in zip(answers, prompts, questions * len(pages), strict=True):
        grammar = engine.grammars.logits_processor(prompt.constraint, 1) if prompt.constraint else None
        expected = reference_answer(
            processor,
            model,
            pages[prompt.page],
            prompt.text,
            prompt.max_new_tokens,
            **({"logits_processor": [grammar]} if grammar else {}),
        )
        assert (answer.text, answer.generated_tokens) == expected, question.id
    return list(zip(answers, prompts, questions * len(pages), strict=True))


@pytest.mark.parametrize("settings", [{"decode_slots": 2}, {"continuous_batching": False}])
def test_constrained_answers_are_allowed_and_equal_generate_with_the_same_grammar(
    tiny_model: Path, pages: list[np.ndarray], reference: tuple[object, object], settings: dict[str, object]
) -> None:
    """Every choice and boolean answer is one of its allowed strings (the random model alone would write
    anything), amounts take their regular form, and each equals transformers' generate under the same
    xgrammar logits processor."""
    questions = [QuestionTemplate(id="free", text=QUESTIONS[0], max_new_tokens=8), *CONSTRAINED]
    answered = _answers_equal_generate(tiny_model, settings, questions, pages, reference)
    for answer, _, question in answered:
        if question.allowed_answers:
            assert answer.text.casefold() in question.allowed_answers, (question.id, answer.text)  # or capitalized
        if question.type == "money":
            assert re.fullmatch(question.constraint[1], answer.text), answer.text
    free = [answer.text for answer, _, question in answered if question.id == "free"]
    assert not set(free) & {"yes", "no", "invoice", "receipt", "credit note"}  # unconstrained: anything


@pytest.fixture(scope="module")
def records_reference(records_model: Path) -> tuple[object, object]:
    processor = AutoProcessor.from_pretrained(records_model)
    return processor, AutoModelForImageTextToText.from_pretrained(records_model, dtype=torch.float32).eval()


@pytest.mark.parametrize("settings", [{"decode_slots": 2}, {"continuous_batching": False}])
def test_records_are_json_of_their_schema_and_equal_generate(
    records_model: Path, pages: list[np.ndarray], records_reference: tuple[object, object], settings: dict[str, object]
) -> None:
    """List and object answers under their JSON Schema: each one JSON valid against it, or (cut by its token
    cap) a prefix whose complete records are; each equal to generate under the same processor. The random
    model writes anything the grammar allows: long strings, nulls, lists closed and cut."""
    answered = _answers_equal_generate(records_model, settings, RECORDS, pages, records_reference)
    outcomes = set()
    for answer, prompt, question in answered:
        records, problem = read_records(answer.text, question.type == "list")
        if problem is None:
            jsonschema.validate(json.loads(answer.text), record_schema(question))
        else:
            assert problem.startswith(TRUNCATED) and answer.generated_tokens == prompt.max_new_tokens, answer.text
            jsonschema.validate(records, record_schema(question))
        outcomes.add((question.type, problem and TRUNCATED, bool(records)))
    assert {("list", None, True), ("list", TRUNCATED, False), ("object", None, True)} <= outcomes, outcomes
