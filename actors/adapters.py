"""The model-adapter interface: what the pipeline, the Serve endpoint and the benchmarks know of a model.

A family (Idefics2, Idefics1) implements four things: load a checkpoint (with its PEFT adapter and
quantization), prepare inputs (the prompt of a question, the image features of a page, encoded once),
generate, decode. Everything else (grouping prompts by length, splitting batches that run out of GPU
memory, stop rules, confidences) is shared here, so no caller knows which family it talks to.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from pipeline.config import ModelConfig
from pipeline.images import ImageGeometry, ModelLoadError, PixelNormalizer, model_load_hint

END_OF_UTTERANCE = "<end_of_utterance>"
# Both families are prompted alike: the instruct turn, or the base models' Question/Answer frame.
PROMPT_FORMATS = {
    "chat": "User:<image>{question}<end_of_utterance>\nAssistant:",
    "raw": "<image>Question: {question} Answer:",
}
Item = TypeVar("Item")
Output = TypeVar("Output")


@dataclass(frozen=True)
class Answer:
    text: str
    generated_tokens: int  # tokens generated for this answer, the stop token included
    confidence: float  # mean probability of the generated tokens under the model
    model_ms: float  # this page's share of image encoding plus the wall time of the generate call


@dataclass(frozen=True)
class Prompt:
    page: int  # index of the page in the batch
    text: str
    max_new_tokens: int


@dataclass(frozen=True)
class Checkpoint:
    id: str
    prompt_format: str  # "chat" or "raw"
    note: str


@dataclass(frozen=True)
class FamilyInfo:
    """What `docqa models` shows of a family, and what the config checks rely on."""

    name: str
    model_type: str  # config.json's model_type
    classes: str
    prompt_formats: dict[str, str]  # format → prompt, with {question}
    unknown_prompt_format: str  # the format of a checkpoint that is not listed and has no chat template
    image_splitting: bool
    quantization: tuple[str, ...]
    checkpoints: tuple[Checkpoint, ...]


def resolve_device(num_gpus: float) -> torch.device:
    return torch.device("cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def resolve_attention(attn_implementation: str, device: torch.device, dtype: torch.dtype) -> str:
    """``auto``: flash-attention 2 where it runs (CUDA, half precision, the flash-attn package), else SDPA."""
    if attn_implementation != "auto":
        return attn_implementation
    from transformers.utils import is_flash_attn_2_available

    half = dtype in (torch.bfloat16, torch.float16)
    return "flash_attention_2" if device.type == "cuda" and half and is_flash_attn_2_available() else "sdpa"


def split_on_out_of_memory(run: Callable[[list[Item]], list[Output]], items: list[Item]) -> list[Output]:
    """``run(items)``; when the GPU runs out of memory, the same on each half, recursively, so a batch
    that does not fit is answered in smaller ones instead of failing (one item that does not fit raises)."""
    try:
        return run(items)
    except torch.OutOfMemoryError:
        if len(items) == 1:
            raise
        torch.cuda.empty_cache()
        middle = len(items) // 2
        return split_on_out_of_memory(run, items[:middle]) + split_on_out_of_memory(run, items[middle:])


def quantization_config(quantization: str) -> Any:
    """The model card's 4-bit setting (nf4, double quantization, fp16 compute); AWQ checkpoints carry their own."""
    if quantization != "bnb-4bit":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float16,
    )


def load_pretrained(model: ModelConfig, model_class: Any, device: torch.device) -> tuple[Any, Any]:
    """(model, processor) of a checkpoint on ``device``: dtype, attention, quantization, PEFT adapter."""
    from transformers import AutoProcessor

    quantized = model.quantization != "none"
    if quantized and device.type != "cuda":
        raise ModelLoadError(f"model.quantization={model.quantization} needs a CUDA GPU; this worker has none")
    dtype = torch.float16 if quantized else resolve_dtype(model.dtype, device)
    try:
        processor = AutoProcessor.from_pretrained(model.id, revision=model.revision)
        loaded = model_class.from_pretrained(
            model.id,
            revision=model.revision,
            dtype=dtype,
            attn_implementation=resolve_attention(model.attn_implementation, device, dtype),
            quantization_config=quantization_config(model.quantization),
            device_map={"": device} if quantized else None,
        )
        if model.adapter:
            from peft import PeftModel

            with_adapter = PeftModel.from_pretrained(loaded, model.adapter, revision=model.adapter_revision)
            # Merged LoRA weights cost nothing per token; a 4-bit base keeps the LoRA layers beside it (QLoRA).
            loaded = with_adapter.get_base_model() if quantized else with_adapter.merge_and_unload()
    except Exception as error:
        name = f"{model.id} with adapter {model.adapter}" if model.adapter else model.id
        raise ModelLoadError(model_load_hint(name, error)) from error
    return (loaded if quantized else loaded.to(device)), processor


def newline_token_ids(tokenizer: Any) -> list[int]:
    """Every token whose text holds a newline: generation stops on the first one (the base models' stop rule)."""
    texts = tokenizer.batch_decode([[token] for token in range(len(tokenizer))])
    return [token for token, text in enumerate(texts) if "\n" in text]


class ModelAdapter(ABC):
    """One model family behind the interface the pipeline uses: ``load``, ``prompt``, ``answer``.

    Subclasses prepare inputs (``prompt``, ``_encode``, ``_generation_inputs``) and name their model class;
    generation, decoding, batching and memory handling are shared."""

    info: ClassVar[FamilyInfo]
    model_class: ClassVar[str]  # transformers class that loads the checkpoint

    def __init__(self, model: Any, processor: Any, geometry: ImageGeometry, model_config: ModelConfig) -> None:
        """From a loaded model and processor (the benchmarks build full-size models in memory); ``load``
        loads a checkpoint."""
        self.model = model.eval()
        self.processor = processor
        self.geometry = geometry
        self.device = next(model.parameters()).device
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.normalizer = PixelNormalizer(geometry)
        self.prompt_format = self.resolve_prompt_format(model_config, processor)
        self.stop_at_newline = (
            self.prompt_format == "raw" if model_config.stop_at_newline is None else model_config.stop_at_newline
        )
        stop = [self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)]
        self.stop_token_ids = sorted(set(stop + (newline_token_ids(self.tokenizer) if self.stop_at_newline else [])))
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id

    @classmethod
    def load(cls, model: ModelConfig, geometry: ImageGeometry, device: torch.device) -> ModelAdapter:
        import transformers

        loaded, processor = load_pretrained(model, getattr(transformers, cls.model_class), device)
        return cls(loaded, processor, geometry, model)

    @classmethod
    def resolve_prompt_format(cls, model: ModelConfig, processor: Any) -> str:
        """The configured format; for auto, the known checkpoint's (by Hub id, or by the name of a local
        directory it was downloaded to), else chat when the processor ships a chat template (instruct and
        chat fine-tunes of Idefics2 do), else the family's default."""
        if model.prompt_format != "auto":
            return model.prompt_format
        name = PurePosixPath(model.id.rstrip("/")).name
        for checkpoint in cls.info.checkpoints:
            if model.id == checkpoint.id or name == PurePosixPath(checkpoint.id).name:
                return checkpoint.prompt_format
        return "chat" if getattr(processor, "chat_template", None) else cls.info.unknown_prompt_format

    def prompt(self, question: str) -> str:
        """The model prompt for a question about one page, in this checkpoint's format."""
        return self.info.prompt_formats[self.prompt_format].format(question=question)

    @abstractmethod
    def _encode(self, pages: list[list[np.ndarray]]) -> list[torch.Tensor]:
        """Image features of each page (its sub-images through the vision encoder and perceiver)."""

    @abstractmethod
    def _generation_inputs(self, prompts: list[str], pages: list[int], features: list[torch.Tensor]) -> dict[str, Any]:
        """``generate`` keyword arguments for prompts, prompt i about the page whose image features are
        ``features[pages[i]]``; ``input_ids`` among them."""

    @torch.inference_mode()
    def encode_pages(self, pages: list[list[np.ndarray]]) -> list[torch.Tensor]:
        """Image features, once per page. Pages are encoded in groups of the same padded size: images of a
        call are padded to the largest, so a portrait page beside a landscape one would double the work."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, images in enumerate(pages):
            groups[max(image.shape[0] for image in images), max(image.shape[1] for image in images)].append(index)
        features: list[torch.Tensor | None] = [None] * len(pages)
        for indices in groups.values():
            encoded = split_on_out_of_memory(self._encode, [pages[i] for i in indices])
            for index, page_features in zip(indices, encoded, strict=True):
                features[index] = page_features
        return [page_features for page_features in features if page_features is not None]

    def pixel_batch(self, pages: list[list[np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values (pages, images, 3, H, W) in the model's dtype and the pixel mask, on the device."""
        values, mask = self.normalizer.batch(pages)
        return torch.from_numpy(values).to(self.device, self.model.dtype), torch.from_numpy(mask).to(self.device)

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str],
        pages: list[int],
        features: list[torch.Tensor],
        max_new_tokens: int,
        fixed_length: bool = False,
    ) -> list[Answer]:
        """Greedy batched generation, prompt i about page ``pages[i]`` from its precomputed image features;
        decodes new tokens only. ``fixed_length`` forces max_new_tokens tokens (benchmarks of random-weight
        models, which never stop)."""
        started = time.perf_counter()
        inputs = self._generation_inputs(prompts, pages, features)
        output = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if fixed_length else None,
            do_sample=False,
            eos_token_id=self.stop_token_ids,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
        elapsed_ms = (time.perf_counter() - started) * 1000
        new_tokens = output.sequences[:, inputs["input_ids"].shape[1] :]
        step_logits = torch.stack(output.logits, dim=1).float()  # (batch, steps, vocab)
        token_probs = step_logits.softmax(-1).gather(-1, new_tokens[:, :, None]).squeeze(-1).cpu()
        answers = []
        for row, tokens in enumerate(new_tokens.cpu().tolist()):
            length = next((i + 1 for i, token in enumerate(tokens) if token in self.stop_token_ids), len(tokens))
            text = self.tokenizer.decode(tokens[:length], skip_special_tokens=True)
            if self.stop_at_newline:
                text = text.split("\n", 1)[0]
            answers.append(Answer(text.strip(), length, float(token_probs[row, :length].mean()), elapsed_ms))
        return answers

    def answer(self, pages: list[list[np.ndarray]], prompts: list[Prompt], fixed_length: bool = False) -> list[Answer]:
        """Answer every prompt (in order) about its page; each page goes through the vision encoder once.
        Prompts with the same length cap share one generate call (split in halves if it runs out of memory)."""
        started = time.perf_counter()
        features = self.encode_pages(pages)
        encode_ms_per_page = (time.perf_counter() - started) * 1000 / max(len(pages), 1)
        by_length: dict[int, list[int]] = defaultdict(list)
        for index, prompt in enumerate(prompts):
            by_length[prompt.max_new_tokens].append(index)
        answers: list[Answer | None] = [None] * len(prompts)
        for max_new_tokens, indices in by_length.items():
            group = split_on_out_of_memory(
                lambda chunk, n=max_new_tokens: self.generate(
                    [prompts[i].text for i in chunk], [prompts[i].page for i in chunk], features, n, fixed_length
                ),
                indices,
            )
            for index, answer in zip(indices, group, strict=True):
                answers[index] = Answer(
                    answer.text, answer.generated_tokens, answer.confidence, answer.model_ms + encode_ms_per_page
                )
        return [answer for answer in answers if answer is not None]
