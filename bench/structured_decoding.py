"""JSON-schema decoding against unconstrained decoding of the same number of tokens (tiny Idefics2 on CPU,
same pages, same run): what a list or object question's grammar costs per token.

Each list and object question is answered first under its JSON Schema (xgrammar's token mask at every
step); then every answer's exact token count is decoded again without a grammar (``fixed_length``: the stop
token is masked until that count), so both sides decode the same tokens of the same prompts. The tiny model
of seed 2 writes records (seed 0's greedy answers are ``[]``); its random weights write long strings, so
most answers run to their cap, as long line-item lists do.

    .venv/bin/python -m bench.structured_decoding [--pages 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from actors.adapters import Prompt
from actors.families import inspect_checkpoint, load_adapter
from bench.model_stage import sample_pages
from jobs.devtools.tiny_models import build_tiny_idefics2
from pipeline.config import ModelConfig, RenderConfig
from pipeline.images import split_page
from pipeline.questions import QuestionTemplate

RECORDS_MODEL = Path(".cache/tiny-idefics2-records")
FIELDS = [
    {"name": "description", "type": "text"},
    {"name": "quantity", "type": "number"},
    {"name": "unit_price", "type": "money"},
    {"name": "amount", "type": "money"},
]
QUESTIONS = [
    QuestionTemplate(id="line_items", text="List every line item.", type="list", fields=FIELDS, max_new_tokens=192),
    QuestionTemplate(id="vendor", text="Who issued it?", type="object", fields=FIELDS, max_new_tokens=96),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of each side (the best is kept)")
    args = parser.parse_args()
    if not (RECORDS_MODEL / "config.json").exists():
        build_tiny_idefics2(RECORDS_MODEL, seed=2)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = ModelConfig(id=str(RECORDS_MODEL), dtype="float32")
    geometry = inspect_checkpoint(config, RenderConfig()).geometry
    engine = load_adapter(config, "idefics2", geometry, torch.device("cpu"))
    pages = [split_page(page, geometry) for page in sample_pages(args.pages, 896)]

    started = time.perf_counter()
    for question in QUESTIONS:
        engine.grammars.compile(question.constraint)
    compile_s = time.perf_counter() - started

    constrained = [
        Prompt(page, engine.prompt(question.question("a.pdf", 1, 1)), question.answer_tokens, question.constraint)
        for page in range(len(pages))
        for question in QUESTIONS
    ]
    engine.answer(pages, constrained)  # warm-up: first-call allocations on both sides
    best_constrained, answers = float("inf"), []
    for _ in range(args.repeats):
        started = time.perf_counter()
        answers = engine.answer(pages, constrained)
        best_constrained = min(best_constrained, time.perf_counter() - started)
    tokens = sum(answer.generated_tokens for answer in answers)
    free = [
        Prompt(prompt.page, prompt.text, answer.generated_tokens)
        for prompt, answer in zip(constrained, answers, strict=True)
    ]
    best_free, free_tokens = float("inf"), 0
    for _ in range(args.repeats):
        started = time.perf_counter()
        free_answers = engine.answer(pages, free, fixed_length=True)
        best_free = min(best_free, time.perf_counter() - started)
        free_tokens = sum(answer.generated_tokens for answer in free_answers)
    assert free_tokens == tokens, (free_tokens, tokens)

    constrained_rate, free_rate = tokens / best_constrained, tokens / best_free
    result = {
        "pages": args.pages,
        "answers": len(answers),
        "tokens": tokens,
        "answers_at_their_cap": sum(
            a.generated_tokens == p.max_new_tokens for a, p in zip(answers, constrained, strict=True)
        ),
        "schema_compile_s": round(compile_s, 3),
        "json_schema_tokens_per_s": round(constrained_rate, 1),
        "unconstrained_tokens_per_s": round(free_rate, 1),
        "ratio": round(constrained_rate / free_rate, 3),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "date": datetime.now(UTC).date().isoformat(),
    }
    print("# bench.structured_decoding: JSON-schema decoding vs unconstrained, same tokens (tiny Idefics2, CPU)")
    print(
        f"{result['answers']} answers, {tokens} tokens ({result['answers_at_their_cap']} at their cap): "
        f"JSON schema {constrained_rate:.1f} tokens/s, unconstrained {free_rate:.1f} tokens/s, "
        f"ratio {result['ratio']:.3f}; schemas compiled once per actor in {compile_s:.3f} s"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
