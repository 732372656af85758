"""The naive baseline, and the reference the pipeline must agree with: one Idefics2Processor call and one
generate per page-question, as in the model card."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def chat_prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


@torch.inference_mode()
def reference_answer(
    processor, model, page: np.ndarray, prompt: str, max_new_tokens: int, fixed_length: bool = False
) -> tuple[str, int]:
    """Greedy answer to ``prompt`` about ``page`` (H, W, 3 uint8), exactly as the model card does it
    (``fixed_length``: exactly max_new_tokens tokens, for random-weight benchmarks)."""
    inputs = processor(text=prompt, images=[[Image.fromarray(page)]], return_tensors="pt")
    stop = [processor.tokenizer.eos_token_id, processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")]
    output = model.generate(
        **inputs.to(model.device),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens if fixed_length else None,
        do_sample=False,
        eos_token_id=stop,
    )
    new_tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
    length = next((i + 1 for i, token in enumerate(new_tokens) if token in stop), len(new_tokens))
    return processor.tokenizer.decode(new_tokens[:length], skip_special_tokens=True).strip(), length
