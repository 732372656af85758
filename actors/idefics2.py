"""Idefics2 (HuggingFaceM4/idefics2-8b and its base, chatty, AWQ and fine-tuned checkpoints).

The page's sub-images go through the vision encoder and perceiver once; every question about the page
reuses those features through ``mm_encoder_outputs``, so the encoder never runs inside ``generate``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from actors.adapters import PROMPT_FORMATS, Checkpoint, FamilyInfo, ModelAdapter


class Idefics2Adapter(ModelAdapter):
    info = FamilyInfo(
        name="idefics2",
        model_type="idefics2",
        classes="Idefics2ForConditionalGeneration + Idefics2Processor",
        prompt_formats=PROMPT_FORMATS,
        unknown_prompt_format="raw",  # Idefics2 instruct checkpoints ship a chat template, base ones do not
        image_splitting=True,
        quantization=("bnb-4bit", "awq"),
        checkpoints=(
            Checkpoint("HuggingFaceM4/idefics2-8b", "chat", "instruct, the default"),
            Checkpoint("HuggingFaceM4/idefics2-8b-base", "raw", "base: answers end at the first newline"),
            Checkpoint("HuggingFaceM4/idefics2-8b-chatty", "chat", "long answers: transcription, summaries"),
            Checkpoint("HuggingFaceM4/idefics2-8b-AWQ", "chat", "AWQ 4-bit language model: quantization awq"),
        ),
    )
    model_class = "AutoModelForImageTextToText"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The prompt text expands <image> into 5 or 1 image blocks; it must agree with our split stage.
        self.processor.image_processor.do_image_splitting = self.geometry.splitting

    def _encode(self, pages: list[list[np.ndarray]]) -> list[torch.Tensor]:
        values, mask = self.pixel_batch(pages)
        return list(self.model.model.get_image_features(pixel_values=values, pixel_attention_mask=mask).pooler_output)

    def _generation_inputs(self, prompts: list[str], features: list[torch.Tensor]) -> dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        inputs = self.processor(text=prompts, padding=True, return_tensors="pt").to(self.device)
        return {**inputs, "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=features)}}
