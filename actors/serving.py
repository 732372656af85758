"""The model side of the online endpoint: a Ray Serve deployment around the batch pipeline's PageAnswerer.

Pages from concurrent requests are gathered by ``@serve.batch`` into one model call (at most
``actors.batch_size`` pages, waiting at most ``serve.batch_wait_timeout_s`` to fill it), exactly as the
batch actor answers a Ray Data batch.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from ray import serve

from actors.answering import PageAnswerer
from actors.checkpoint import CheckpointInfo
from pipeline.config import JobConfig
from pipeline.questions import QuestionTemplate
from pipeline.records import AnswerRow, Page

# A page, the request's questions by id (the page names the ones it gets), the request's id.
PageRequest = tuple[Page, dict[str, QuestionTemplate], str]


@serve.deployment
class AnswerModel:
    def __init__(self, config: JobConfig, checkpoint: CheckpointInfo) -> None:
        self.answerer = PageAnswerer(config, checkpoint, run_id="serve")
        self.batch_sizes: Counter[int] = Counter()  # pages per model call, for monitoring
        self.mixed_calls = 0  # model calls that answered pages of more than one request
        self.answer_page.set_max_batch_size(config.actors.batch_size)
        self.answer_page.set_batch_wait_timeout_s(config.serve.batch_wait_timeout_s)

    @serve.batch
    async def answer_page(self, requests: list[PageRequest]) -> list[list[AnswerRow]]:
        """One page and its request's questions per request → that page's output rows. The model runs in a thread so
        the replica keeps accepting requests (the next batch fills while this one computes)."""
        pages = [page for page, _, _ in requests]
        questions = [templates for _, templates, _ in requests]
        self.batch_sizes[len(pages)] += 1
        self.mixed_calls += len({request_id for *_, request_id in requests}) > 1
        return await asyncio.to_thread(self.answerer.rows, pages, questions)

    def call_counts(self) -> dict[str, Any]:
        """Since the replica started (or ``reset_counts``): how many model calls took how many pages, and how
        many answered pages of more than one request."""
        return {"pages_per_call": dict(self.batch_sizes), "calls_mixing_requests": self.mixed_calls}

    def reset_counts(self) -> None:
        self.batch_sizes.clear()
        self.mixed_calls = 0
