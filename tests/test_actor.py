"""§5(a) answers equal the naive single-sample generate; §5(c) the vision encoder runs once per page."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from actors.adapters import Prompt, split_on_out_of_memory
from actors.checkpoint import ModelLoadError
from actors.families import inspect_checkpoint, load_adapter
from bench.naive import chat_prompt, reference_answer
from jobs.devtools.samples import PAGE_SIZES, invoice_pdf
from pipeline.config import ModelConfig, RenderConfig
from pipeline.images import split_page
from pipeline.pdf import open_pdf
from pipeline.questions import QuestionTemplate

QUESTIONS = [
    QuestionTemplate(id="number", text="What is the invoice number?", max_new_tokens=6),
    QuestionTemplate(id="total", text="What is the total due on page {page_number}?", max_new_tokens=12),
    QuestionTemplate(id="text", text="Transcribe the page.", max_new_tokens=20),
]


@pytest.fixture(scope="module")
def pages(tiny_model: Path) -> list[np.ndarray]:
    geometry = inspect_checkpoint(ModelConfig(id=str(tiny_model)), RenderConfig()).geometry
    rendered = []
    for number, size in enumerate(PAGE_SIZES.values()):
        document = open_pdf(invoice_pdf(number, 1, size), "pymupdf")
        rendered.append(document.render(1, geometry.render_longest_edge))
    return rendered


@pytest.mark.parametrize("splitting", [True, False])
def test_answers_equal_single_sample_generate(tiny_model: Path, pages: list[np.ndarray], splitting: bool) -> None:
    model_config = ModelConfig(id=str(tiny_model), dtype="float32")
    geometry = inspect_checkpoint(model_config, RenderConfig(image_splitting=splitting)).geometry
    engine = load_adapter(model_config, "idefics2", geometry, torch.device("cpu"))
    prompts, expected_questions = [], []
    for page_index in range(len(pages)):
        for template in QUESTIONS:
            question = template.question("inv.pdf", page_index + 1, len(pages))
            prompts.append(Prompt(page_index, engine.prompt(question), template.max_new_tokens))
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
    geometry = inspect_checkpoint(model_config, RenderConfig()).geometry
    engine = load_adapter(model_config, "idefics2", geometry, torch.device("cpu"))
    images_encoded: list[int] = []
    engine.model.model.vision_model.register_forward_hook(
        lambda module, args, kwargs, output: images_encoded.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    pages = pages + pages  # two pages of each size
    prompts = [
        Prompt(page_index, engine.prompt(template.question("f", 1, 1)), template.max_new_tokens)
        for page_index in range(len(pages))
        for template in QUESTIONS
    ]
    split_pages = [split_page(page, geometry) for page in pages]
    answers = engine.answer(split_pages, prompts)
    assert len(answers) == 3 * len(pages)
    # 5 sub-images per page (4 crops + the page), not 5 per question; one encoder call per padded page size.
    assert sum(images_encoded) == 5 * len(pages)
    sizes = {(max(i.shape[0] for i in images), max(i.shape[1] for i in images)) for images in split_pages}
    assert len(images_encoded) == len(sizes) < len(pages)


@pytest.mark.parametrize(("splitting", "prompt_format"), [(True, "chat"), (False, "chat"), (True, "raw")])
def test_questions_about_a_page_share_its_image_tokens_read_once(
    tiny_model: Path, pages: list[np.ndarray], splitting: bool, prompt_format: str
) -> None:
    """The shared-prefix KV cache: the language model reads each page's image tokens once, however many
    questions (of different lengths: padding between prefix and question) ask about it, and every answer
    is still the naive generate's, in both prompt formats (raw: with the newline stop rule)."""
    model_config = ModelConfig(id=str(tiny_model), dtype="float32", prompt_format=prompt_format)
    geometry = inspect_checkpoint(model_config, RenderConfig(image_splitting=splitting)).geometry
    engine = load_adapter(model_config, "idefics2", geometry, torch.device("cpu"))
    image_tokens_read: list[int] = []

    def count_image_tokens(module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        """Image tokens in the prompt the language model reads (decoding steps, one token each, excluded:
        a random model may well decode the image token id)."""
        if kwargs["input_ids"].shape[1] > 1:
            image_tokens_read.append(int((kwargs["input_ids"] == engine.model.config.image_token_id).sum()))

    engine.model.model.register_forward_hook(count_image_tokens, with_kwargs=True)
    questions = ["What is the invoice number?", "Total?", "Who is the customer named on this invoice, in full?"]
    prompts = [Prompt(page, engine.prompt(question), 10) for page in range(len(pages)) for question in questions]
    answers = engine.answer([split_page(page, geometry) for page in pages], prompts)

    per_page = engine.processor.image_seq_len * (5 if splitting else 1)
    assert sum(image_tokens_read) == per_page * len(pages)  # without the cache: per question, 3 times as many
    processor = AutoProcessor.from_pretrained(tiny_model)
    processor.image_processor.do_image_splitting = splitting
    model = AutoModelForImageTextToText.from_pretrained(tiny_model, dtype=torch.float32).eval()
    for answer, prompt in zip(answers, prompts, strict=True):
        expected = reference_answer(
            processor, model, pages[prompt.page], prompt.text, 10, stop_at_newline=prompt_format == "raw"
        )
        assert (answer.text, answer.generated_tokens) == expected

    without = load_adapter(
        model_config.model_copy(update={"prefix_cache": False}), "idefics2", geometry, torch.device("cpu")
    )
    image_tokens_read.clear()
    without.model.model.register_forward_hook(count_image_tokens, with_kwargs=True)
    assert [a.text for a in without.answer([split_page(page, geometry) for page in pages], prompts)] == [
        a.text for a in answers
    ]
    assert sum(image_tokens_read) == per_page * len(prompts)


def test_attention_auto_is_sdpa_where_flash_attention_cannot_run(tiny_model: Path) -> None:
    from actors.adapters import resolve_attention

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for installed in (True, False):
        assert resolve_attention("auto", cpu, torch.bfloat16, installed) == "sdpa"
        assert resolve_attention("auto", cuda, torch.float32, installed) == "sdpa"  # flash runs in half precision
        assert resolve_attention("eager", cuda, torch.bfloat16, installed) == "eager"  # an explicit choice is kept
    assert resolve_attention("auto", cuda, torch.bfloat16, flash_installed=True) == "flash_attention_2"
    assert resolve_attention("auto", cuda, torch.float16, flash_installed=True) == "flash_attention_2"
    assert resolve_attention("auto", cuda, torch.bfloat16, flash_installed=False) == "sdpa"
    assert resolve_attention("auto", cpu, torch.bfloat16) == "sdpa"  # this machine: no CUDA, no flash-attn
    model_config = ModelConfig(id=str(tiny_model), dtype="float32")
    engine = load_adapter(
        model_config, "idefics2", inspect_checkpoint(model_config, RenderConfig()).geometry, torch.device("cpu")
    )
    assert model_config.attn_implementation == "auto" and engine.model.config._attn_implementation == "sdpa"


def test_a_batch_that_runs_out_of_memory_is_split() -> None:
    calls: list[int] = []

    def run(items: list[int]) -> list[int]:
        calls.append(len(items))
        if len(items) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated: batches over 2 do not fit)")
        return [item * 10 for item in items]

    assert split_on_out_of_memory(run, list(range(7))) == [item * 10 for item in range(7)]
    assert calls == [7, 3, 1, 2, 4, 2, 2]
    with pytest.raises(torch.OutOfMemoryError, match="batches over 2 do not fit"):  # one item that cannot fit
        split_on_out_of_memory(lambda items: run(items * 3), [1])


def test_a_page_the_model_fails_on_gets_model_error_and_its_neighbours_their_answers(
    tiny_model: Path, pages: list[np.ndarray]
) -> None:
    from actors.answering import AnswerPages
    from actors.checkpoint import CheckpointInfo
    from pipeline.config_loading import load_config
    from pipeline.images import pack_images
    from pipeline.record_schema import to_table
    from pipeline.records import Page

    config = load_config(
        None,
        {
            "input": "in",
            "output": "out",
            "model": {"id": str(tiny_model)},
            "questions": [q.model_dump() for q in QUESTIONS[:2]],
        },
    )
    geometry = inspect_checkpoint(config.model, config.render).geometry
    buffer, shapes = pack_images(split_page(pages[0], geometry))
    pages_in = []
    for uri, sha256, sub_images in [("/in/good.pdf", "a", buffer), ("/in/broken.pdf", "b", buffer[: len(buffer) // 2])]:
        page = Page(
            document=uri,
            file_size=10,
            source_version="v",
            etag=None,
            version_id=None,
            sha256=sha256 * 64,
            scope="page",
            num_pages=1,
            page_number=1,
            question_ids=["number", "total"],
            by_model=[True, True],
            document_rows=2,
            repaired=False,
            status="ok",
            error=None,
            render_ms=1.0,
        )
        # the second page's pixels are cut short
        page.sub_images, page.sub_image_shapes = sub_images, shapes
        pages_in.append(page)
    batch = to_table(pages_in, Page)  # the actor's input, as the CPU stages hand it on
    rows = AnswerPages(config, CheckpointInfo("idefics2", "idefics2", None, geometry), "r1")(batch).to_pylist()
    by_document = {(row["document"], row["question_id"]): row for row in rows}
    assert len(rows) == 4 and set(by_document) == {
        (d, q) for d in ("/in/good.pdf", "/in/broken.pdf") for q in ("number", "total")
    }
    for question in ("number", "total"):
        good, broken = by_document["/in/good.pdf", question], by_document["/in/broken.pdf", question]
        assert good["status"] == "ok" and good["answer"] is not None
        assert (
            broken["status"] == "model_error"
            and "model failed on this page" in broken["error"]
            and broken["answer"] is None
        )


def test_encoder_and_decoder_out_of_memory_are_answered_in_halves(tiny_model: Path) -> None:
    """A GPU that fits one page in the vision encoder and two prompts in a prefill, simulated by forward
    hooks on the real model's towers that raise torch.OutOfMemoryError above those sizes: `answer`
    (encode_pages and the decoder's prefill) halves its batches and gives the answers of an unconstrained
    run. (The slot decoder's steps are sized by the free memory when its cache is made.)"""
    model_config = ModelConfig(id=str(tiny_model), dtype="float32")
    geometry = inspect_checkpoint(model_config, RenderConfig(image_splitting=False)).geometry
    engine = load_adapter(model_config, "idefics2", geometry, torch.device("cpu"))
    letter = [
        open_pdf(invoice_pdf(n, 1, (612, 792)), "pymupdf").render(1, geometry.render_longest_edge) for n in range(4)
    ]
    split = [split_page(page, geometry) for page in letter]  # one size: the encoder takes them in one call
    prompts = [
        Prompt(page_index, engine.prompt(template.question("inv.pdf", page_index + 1, len(split))), 6)
        for page_index in range(len(split))
        for template in QUESTIONS
    ]
    expected = [(answer.text, answer.generated_tokens) for answer in engine.answer(split, prompts)]
    refused = {"vision_model": 0, "text_model": 0}
    caps = {"vision_model": 1, "text_model": 2}  # images per encoder call, prompts per prefill

    def refuse_above(name: str):
        def hook(module, args, kwargs):
            batch = [kwargs.get(key) for key in ("pixel_values", "inputs_embeds", "input_ids")] + list(args[:1])
            tensor = next(value for value in batch if isinstance(value, torch.Tensor))
            prefill = name == "vision_model" or tensor.shape[1] > 1  # decode steps run every slot at once
            if prefill and tensor.shape[0] > caps[name]:
                refused[name] += 1
                raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {name} batch {tensor.shape[0]})")

        return hook

    handles = [
        getattr(engine.model.model, name).register_forward_pre_hook(refuse_above(name), with_kwargs=True)
        for name in caps
    ]
    try:
        halved = [(answer.text, answer.generated_tokens) for answer in engine.answer(split, prompts)]
    finally:
        for handle in handles:
            handle.remove()
    assert halved == expected
    assert refused["vision_model"] >= 1 and refused["text_model"] >= 1, refused  # both were refused, then halved


def test_an_actor_whose_image_processor_disagrees_with_the_runs_geometry_refuses_to_load(tiny_model: Path) -> None:
    """The run sizes its pages by what the driver read of the checkpoint (actors/checkpoint.py); an actor whose
    processor would prepare them otherwise stops with the two geometries rather than answer."""
    model_config = ModelConfig(id=str(tiny_model), dtype="float32")
    geometry = inspect_checkpoint(model_config, RenderConfig()).geometry
    for other in (replace(geometry, longest_edge=geometry.longest_edge * 2), replace(geometry, mean=(0.0, 0.0, 0.0))):
        with pytest.raises(ModelLoadError, match="does not match what the run read of the checkpoint"):
            load_adapter(model_config, "idefics2", other, torch.device("cpu"))
    assert load_adapter(model_config, "idefics2", geometry, torch.device("cpu")).geometry == geometry
