"""The naive baseline, and the reference the pipeline must agree with: one processor call and one generate
per page-question, as in the model cards (Idefics2 instruct and base, Idefics1)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def chat_prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def raw_prompt(question: str) -> str:
    """The base checkpoint's prompt: the image, then the question in a Question/Answer frame."""
    return f"<image>Question: {question} Answer:"


def _greedy(
    processor, model, inputs, max_new_tokens: int, fixed_length: bool, stop_at_newline: bool, logits_processor=None
):
    tokenizer = processor.tokenizer
    stop = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_utterance>")]
    output = model.generate(
        **inputs.to(model.device),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens if fixed_length else None,
        do_sample=False,
        eos_token_id=stop,
        stop_strings=["\n"] if stop_at_newline else None,
        tokenizer=tokenizer if stop_at_newline else None,
        logits_processor=logits_processor,
    )
    new_tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
    length = next((i + 1 for i, token in enumerate(new_tokens) if token in stop), len(new_tokens))
    text = tokenizer.decode(new_tokens[:length], skip_special_tokens=True)
    return (text.split("\n", 1)[0] if stop_at_newline else text).strip(), length


@torch.inference_mode()
def reference_answer(
    processor,
    model,
    page: np.ndarray,
    prompt: str,
    max_new_tokens: int,
    fixed_length: bool = False,
    stop_at_newline: bool = False,
    logits_processor=None,
) -> tuple[str, int]:
    """Greedy answer to an Idefics2 ``prompt`` about ``page`` (H, W, 3 uint8), exactly as the model card does
    it (``fixed_length``: exactly max_new_tokens tokens, for random-weight benchmarks; ``stop_at_newline``:
    the base checkpoint's stop rule; ``logits_processor``: e.g. a grammar's)."""
    inputs = processor(text=prompt, images=[[Image.fromarray(page)]], return_tensors="pt")
    return _greedy(processor, model, inputs, max_new_tokens, fixed_length, stop_at_newline, logits_processor)


@torch.inference_mode()
def idefics1_reference_answer(
    processor, model, page: np.ndarray, question: str, max_new_tokens: int
) -> tuple[str, int]:
    """Greedy answer of an Idefics1 instruct checkpoint, prompted as its model card does."""
    sample = ["User:", Image.fromarray(page), f"{question}<end_of_utterance>", "\nAssistant:"]
    inputs = processor(text=[sample], add_end_of_utterance_token=False, return_tensors="pt")
    return _greedy(processor, model, inputs, max_new_tokens, False, False)
