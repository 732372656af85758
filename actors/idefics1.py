"""Idefics1 (HuggingFaceM4/idefics-9b-instruct and family): IdeficsForVisionText2Text, whose text layers
cross-attend to the image instead of reading image tokens. No image splitting: one square image per page.

The prompt is the one IdeficsProcessor builds from ["User:", image, "question<end_of_utterance>",
"\\nAssistant:"] (the model card's, with add_end_of_utterance_token=False); the page goes through the vision
encoder once and every question reuses its output as ``image_encoder_embeddings``. (The perceiver runs
in every step: since transformers 5.24 the model feeds its own image outputs back at each decoding step as
encoder embeddings, so handing it perceiver outputs would resample them twice.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from actors.adapters import ModelAdapter
from actors.catalog import IDEFICS

IMAGE_IN_PROMPT = "<fake_token_around_image><image><fake_token_around_image>"


class IdeficsAdapter(ModelAdapter):
    info = IDEFICS
    model_class = "IdeficsForVisionText2Text"

    @classmethod
    def prompt_template(cls, prompt_format: str) -> str:
        # As IdeficsProcessor writes it: the image between its two marker tokens.
        return super().prompt_template(prompt_format).replace("<image>", IMAGE_IN_PROMPT)

    def prompt(self, question: str) -> str:
        # IdeficsProcessor writes the BOS token into the text: tokenize adds no special tokens.
        return f"{self.tokenizer.bos_token}{super().prompt(question)}"

    def _encode(self, pages: list[list[np.ndarray]]) -> list[torch.Tensor]:
        values, _ = self.pixel_batch(pages)
        hidden = self.model.model.vision_model(pixel_values=values.flatten(0, 1)).last_hidden_state
        return list(hidden.unflatten(0, values.shape[:2]))  # per page: (1 image, tokens, hidden)

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        return self.tokenizer(prompts, add_special_tokens=False)["input_ids"]

    def _generation_inputs(
        self, token_lists: list[list[int]], pages: list[int], features: list[torch.Tensor]
    ) -> dict[str, Any]:
        from transformers.models.idefics.processing_idefics import (
            image_attention_mask_for_packed_input_ids,
            incremental_to_binary_attention_mask,
        )

        input_ids, attention_mask = self.left_padded(token_lists)
        incremental, _ = image_attention_mask_for_packed_input_ids(input_ids.cpu(), self.tokenizer, "pt")
        image_mask = incremental_to_binary_attention_mask(incremental, "pt", num_classes=1)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "image_attention_mask": image_mask.to(self.device),
            "image_encoder_embeddings": torch.stack([features[page] for page in pages]),
        }
