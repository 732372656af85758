"""Model stage: the naive approach (one Idefics2Processor call and one generate per page-question, as in
the model card) against our engine (each page encoded once, all its questions in one batched generate),
same pages, same greedy outputs (checked), same run. Then our engine with and without the shared-prefix
KV cache (model.prefix_cache), on the small architecture whose pages carry Idefics2-8B's image-token count.

    .venv/bin/python -m bench.model_stage                       # tiny Idefics2 on CPU, 1, 3 and 8 questions
    .venv/bin/python -m bench.gpu                               # full-size Idefics2-8B on a GPU (bench/gpu.py)
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from actors.adapters import ModelAdapter, Prompt
from actors.checkpoint import image_geometry
from actors.families import inspect_checkpoint, load_adapter
from actors.idefics2 import Idefics2Adapter
from bench import tiny_model
from bench.naive import chat_prompt, reference_answer
from jobs.devtools.tiny_models import build_random_idefics2
from pipeline.config import ModelConfig
from pipeline.images import ImageGeometry, split_page

QUESTIONS = [
    "What is the invoice number?",
    "What is the invoice date?",
    "What is the total amount due?",
    "Who issued the invoice?",
    "Who is the customer?",
    "What is the tax rate?",
    "What is the currency?",
    "What are the payment terms?",
]


@dataclass
class StageResult:
    questions_per_page: int
    max_new_tokens: int
    page_questions: int
    ours_s: float
    naive_page_questions: int
    naive_s: float
    same_answers: int  # of the naive page-questions, how many gave exactly our answer

    @property
    def ours_rate(self) -> float:
        return self.page_questions / self.ours_s

    @property
    def naive_rate(self) -> float:
        return self.naive_page_questions / self.naive_s

    @property
    def ratio(self) -> float:
        return self.ours_rate / self.naive_rate

    def line(self) -> str:
        return (
            f"{self.questions_per_page} question(s)/page x {self.max_new_tokens} tokens: "
            f"naive {self.naive_rate:8.2f} page-questions/s, ours {self.ours_rate:8.2f} page-questions/s, "
            f"ratio {self.ratio:5.2f} (same answers {self.same_answers}/{self.naive_page_questions})"
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "ours_rate": self.ours_rate, "naive_rate": self.naive_rate, "ratio": self.ratio}


def sample_pages(count: int, longest_edge: int) -> list[np.ndarray]:
    """``count`` rendered invoice pages of mixed sizes (letter, A4, A4 landscape)."""
    from jobs.devtools.samples import PAGE_SIZES, invoice_pdf  # PyMuPDF: imported here, bench.gpu runs without it
    from pipeline.pdf import open_pdf

    sizes = list(PAGE_SIZES.values())
    pages = []
    for number in range(count):
        document = open_pdf(invoice_pdf(number, 1, sizes[number % len(sizes)]), "pymupdf")
        pages.append(document.render(1, longest_edge))
        document.close()
    return pages


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def answer_all(
    engine: ModelAdapter,
    split: list[list[np.ndarray]],
    prompts_text: list[str],
    max_new_tokens: int,
    batch_pages: int,
    fixed_length: bool,
) -> tuple[list[str], float]:
    """Our engine over split pages, every prompt on every page, ``batch_pages`` pages per call: the answers
    (page by page) and the seconds it took."""
    answers: list[str] = []
    _synchronize()
    started = time.perf_counter()
    for first in range(0, len(split), batch_pages):
        chunk = split[first : first + batch_pages]
        prompts = [Prompt(i, text, max_new_tokens) for i in range(len(chunk)) for text in prompts_text]
        answers += [answer.text for answer in engine.answer(chunk, prompts, fixed_length)]
    _synchronize()
    return answers, time.perf_counter() - started


def measure(
    engine: ModelAdapter,
    pages: list[np.ndarray],
    geometry: ImageGeometry,
    questions_per_page: int,
    max_new_tokens: int,
    batch_pages: int,
    naive_limit: int | None = None,
    fixed_length: bool = False,
) -> StageResult:
    """Ours over every page, in batches of ``batch_pages``; the naive loop over the first ``naive_limit``
    page-questions (all by default), whose answers must equal ours."""
    questions = QUESTIONS[:questions_per_page]
    processor = engine.processor
    prompts_text = [chat_prompt(processor, question) for question in questions]
    split = [split_page(page, geometry) for page in pages]
    ours, ours_s = answer_all(engine, split, prompts_text, max_new_tokens, batch_pages, fixed_length)

    pairs = [(page, question) for page in range(len(pages)) for question in range(len(questions))]
    pairs = pairs[: naive_limit or len(pairs)]
    processor.image_processor.do_image_splitting = geometry.splitting
    same = 0
    started = time.perf_counter()
    for page, question in pairs:
        text, _ = reference_answer(
            processor, engine.model, pages[page], prompts_text[question], max_new_tokens, fixed_length
        )
        same += text == ours[page * len(questions) + question]
    _synchronize()
    naive_s = time.perf_counter() - started
    return StageResult(questions_per_page, max_new_tokens, len(ours), ours_s, len(pairs), naive_s, same)


@dataclass
class PrefixCacheResult:
    questions_per_page: int
    page_questions: int
    without_s: float
    with_s: float
    same_answers: int

    @property
    def ratio(self) -> float:
        return self.without_s / self.with_s

    def line(self) -> str:
        return (
            f"{self.questions_per_page} question(s)/page: without {self.page_questions / self.without_s:8.2f} "
            f"page-questions/s, with {self.page_questions / self.with_s:8.2f} page-questions/s, ratio "
            f"{self.ratio:5.2f} (same answers {self.same_answers}/{self.page_questions})"
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def compare_prefix_cache(
    model: Any,
    processor: Any,
    pages: list[np.ndarray],
    geometry: ImageGeometry,
    questions_per_page: int,
    max_new_tokens: int,
    batch_pages: int,
    fixed_length: bool = False,
) -> PrefixCacheResult:
    """Our engine on the same pages with model.prefix_cache off, then on; the answers must be the same."""
    split = [split_page(page, geometry) for page in pages]
    prompts_text = [chat_prompt(processor, question) for question in QUESTIONS[:questions_per_page]]
    runs = {}
    for prefix_cache in (False, True):
        engine = Idefics2Adapter(
            model, processor, geometry, ModelConfig(prompt_format="chat", prefix_cache=prefix_cache)
        )
        answer_all(engine, split[:1], prompts_text, 2, 1, fixed_length)  # warm-up
        runs[prefix_cache] = answer_all(engine, split, prompts_text, max_new_tokens, batch_pages, fixed_length)
    (without, without_s), (with_cache, with_s) = runs[False], runs[True]
    same = sum(a == b for a, b in zip(without, with_cache, strict=True))
    return PrefixCacheResult(questions_per_page, len(without), without_s, with_s, same)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-pages", type=int, default=4, help="pages per engine call (actors.batch_size)")
    args = parser.parse_args()

    from pipeline.config import RenderConfig

    torch.manual_seed(0)
    model = tiny_model()
    model_config = ModelConfig(id=str(model), dtype="float32")
    geometry = inspect_checkpoint(model_config, RenderConfig()).geometry
    engine = load_adapter(model_config, "idefics2", geometry, torch.device("cpu"))
    pages = sample_pages(args.pages, geometry.render_longest_edge)
    measure(engine, pages[:1], geometry, 1, 2, 1)  # warm-up
    print(f"# bench.model_stage  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  {platform.node()}  {os.cpu_count()} CPUs")
    print(f"tiny Idefics2 on CPU (float32, {torch.get_num_threads()} threads), {args.pages} pages of mixed sizes,")
    print(f"splitting {'on' if geometry.splitting else 'off'}, {args.batch_pages} pages per engine call")
    for questions_per_page in (1, 3, 8):
        result = measure(engine, pages, geometry, questions_per_page, args.max_new_tokens, args.batch_pages)
        assert result.same_answers == result.naive_page_questions, result
        print(result.line())

    model, processor = build_random_idefics2("small")
    geometry = image_geometry(processor.image_processor, True)
    pages = sample_pages(args.pages, geometry.render_longest_edge)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(f"shared-prefix KV cache, small architecture ({parameters / 1e6:.0f} M parameters, 64 image tokens per")
    print(f"sub-image: {args.pages} pages, answers fixed at {args.max_new_tokens} tokens), ours without vs with:")
    for questions_per_page in (1, 3, 8):
        prefix = compare_prefix_cache(
            model, processor, pages, geometry, questions_per_page, args.max_new_tokens, args.batch_pages, True
        )
        assert prefix.same_answers == prefix.page_questions, prefix
        print(prefix.line())


if __name__ == "__main__":
    main()
