"""Idefics2 (HuggingFaceM4/idefics2-8b and its base, chatty, AWQ and fine-tuned checkpoints).

The page's sub-images go through the vision encoder and perceiver once; every question about the page
reuses those features through ``mm_encoder_outputs``, so the encoder never runs inside ``generate``. With
``model.prefix_cache`` the prompt tokens all questions share (``User:`` and the page's 66-326 image tokens)
are read once per page too, and each question starts from a copy of their KV cache.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from actors.adapters import ModelAdapter
from actors.catalog import IDEFICS2
from pipeline.config import ModelConfig
from pipeline.images import ImageGeometry


class Idefics2Adapter(ModelAdapter):
    info = IDEFICS2
    model_class = "AutoModelForImageTextToText"

    def __init__(self, model: Any, processor: Any, geometry: ImageGeometry, model_config: ModelConfig) -> None:
        super().__init__(model, processor, geometry, model_config)
        self.prefix_cache = model_config.prefix_cache
        # The prompt text expands <image> into 5 or 1 image blocks; it must agree with our split stage.
        self.processor.image_processor.do_image_splitting = self.geometry.splitting

    slot_decoding = True  # image tokens are read at prefill; decoding needs only the KV cache

    def _encode(self, pages: list[list[np.ndarray]]) -> list[torch.Tensor]:
        values, mask = self.pixel_batch(pages)
        return list(self.model.model.get_image_features(pixel_values=values, pixel_attention_mask=mask).pooler_output)

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        return self.processor(text=prompts)["input_ids"]

    def _generation_inputs(
        self, token_lists: list[list[int]], pages: list[int], features: list[torch.Tensor]
    ) -> dict[str, Any]:
        if self.prefix_cache and len(set(pages)) < len(pages):  # some page has several questions to share it
            shared = shared_prefix_length(token_lists)
            if all(self.model.config.image_token_id not in tokens[shared:] for tokens in token_lists):
                return self._prefilled_inputs(token_lists, shared, pages, features)
        input_ids, attention_mask = self.left_padded(token_lists)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_encoder_outputs": image_outputs([features[page] for page in pages]),
        }

    def _prefilled_inputs(
        self, token_lists: list[list[int]], shared: int, pages: list[int], features: list[torch.Tensor]
    ) -> dict[str, Any]:
        """Run the shared prefix once per page, then lay each prompt out as prefix | padding | its own tokens
        with the prefix's KV cache copied to it. Position ids follow the attention mask, so every prompt
        sees the positions it has when left padded; the model reads only the tokens past the cache."""
        distinct = sorted(set(pages))
        prefix = torch.tensor(token_lists[0][:shared])
        prefix_ids = prefix.repeat(len(distinct), 1).to(self.device)
        prefilled = self.model(
            input_ids=prefix_ids,
            attention_mask=torch.ones_like(prefix_ids),
            mm_encoder_outputs=image_outputs([features[page] for page in distinct]),
            use_cache=True,
            logits_to_keep=1,
        )
        cache = prefilled.cache
        cache.batch_select_indices(torch.tensor([distinct.index(page) for page in pages], device=self.device))
        own, own_mask = self.left_padded([tokens[shared:] for tokens in token_lists])
        input_ids = torch.cat([prefix_ids[:1].expand(len(token_lists), -1), own], dim=1)
        attention_mask = torch.cat([torch.ones_like(input_ids[:, :shared]), own_mask], dim=1)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache}

    def _decode_step(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        hidden = self.model.model.text_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True
        ).last_hidden_state
        return self.model.lm_head(hidden[:, -1])


def image_outputs(features: list[torch.Tensor]) -> dict[str, Any]:
    """Precomputed image features in the form Idefics2's forward takes instead of pixel values."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return {"image": BaseModelOutputWithPooling(pooler_output=features)}


def shared_prefix_length(token_lists: list[list[int]]) -> int:
    """How many leading tokens all prompts have in common, leaving each at least one token of its own
    (``generate`` needs one to start from)."""
    shared = min(len(tokens) for tokens in token_lists) - 1
    for position in range(shared):
        if any(tokens[position] != token_lists[0][position] for tokens in token_lists):
            return position
    return shared
