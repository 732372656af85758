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

from actors.catalog import FamilyInfo
from actors.checkpoint import ModelLoadError, image_geometry, model_load_hint
from actors.constraints import Constraint, Grammars
from actors.decoding import DecodeRequest, Prefilled, SlotDecoder
from pipeline.config import ModelConfig
from pipeline.images import ImageGeometry

END_OF_UTTERANCE = "<end_of_utterance>"
ENCODER_IMAGES = 40  # sub-images per vision-encoder call (8 split pages): bounds its activations
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
    constraint: Constraint | None = None  # the grammar the answer is decoded under (QuestionTemplate.constraint)


def resolve_device(num_gpus: float) -> torch.device:
    return torch.device("cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def resolve_attention(
    attn_implementation: str, device: torch.device, dtype: torch.dtype, flash_installed: bool | None = None
) -> str:
    """``auto``: flash-attention 2 where it runs (CUDA, half precision, the flash-attn package), else SDPA.
    ``flash_installed``: whether the flash-attn package is usable (default: ask transformers)."""
    if attn_implementation != "auto":
        return attn_implementation
    if flash_installed is None:
        from transformers.utils import is_flash_attn_2_available

        flash_installed = is_flash_attn_2_available()
    half = dtype in (torch.bfloat16, torch.float16)
    return "flash_attention_2" if device.type == "cuda" and half and flash_installed else "sdpa"


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


def load_pretrained(
    model: ModelConfig, model_class: Any, device: torch.device, geometry: ImageGeometry
) -> tuple[Any, Any]:
    """(model, processor) of a checkpoint on ``device``: dtype, attention, quantization, PEFT adapter. The run's
    pages were sized by what the driver read of the checkpoint (actors/checkpoint.py): a processor that would
    prepare them otherwise stops the actor, before the weights load, rather than answer from other pixels."""
    from transformers import AutoProcessor

    quantized = model.quantization != "none"
    if quantized and device.type != "cuda":
        raise ModelLoadError(f"model.quantization={model.quantization} needs a CUDA GPU; this worker has none")
    dtype = torch.float16 if quantized else resolve_dtype(model.dtype, device)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars of every actor, relayed to the driver
    try:
        processor = AutoProcessor.from_pretrained(model.id, revision=model.revision)
        loaded_geometry = image_geometry(processor.image_processor, geometry.splitting, model.id)
        if loaded_geometry != geometry:
            raise ModelLoadError(
                f"{model.id}: its image processor, as loaded, does not match what the run read of the checkpoint: "
                f"{loaded_geometry} against {geometry}"
            )
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
    except ModelLoadError:
        raise
    except Exception as error:
        name = f"{model.id} with adapter {model.adapter}" if model.adapter else model.id
        raise ModelLoadError(model_load_hint(name, error)) from error
    return (loaded if quantized else loaded.to(device)), processor


def newline_token_ids(tokenizer: Any) -> list[int]:
    """Every token whose text holds a newline: generation stops on the first one (the base models' stop rule)."""
    texts = tokenizer.batch_decode([[token] for token in range(len(tokenizer))])
    return [token for token, text in enumerate(texts) if "\n" in text]


class PixelNormalizer:
    """uint8 sub-images -> pixel_values and pixel_attention_mask on the model's device: rescale, normalize
    and zero padding, bit-identical to the Idefics processors. A per-channel table of the 256 uint8 levels is
    computed with the processors' own float64-then-float32 arithmetic and looked up on the device, so pages
    cross to the GPU as uint8 (a quarter of float32) and the CPU does no per-pixel arithmetic."""

    def __init__(self, geometry: ImageGeometry, device: torch.device) -> None:
        levels = (np.arange(256, dtype=np.float64) * geometry.rescale_factor).astype(np.float32)
        mean = np.array(geometry.mean, dtype=np.float32)[:, None]
        std = np.array(geometry.std, dtype=np.float32)[:, None]
        table = ((levels[None, :] - mean) / std).astype(np.float32)  # (3, 256)
        self.device = device
        self.table = torch.from_numpy(table).to(device)

    def batch(self, pages: list[list[np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pages of (H, W, 3) uint8 sub-images -> pixel_values (pages, images, 3, H, W) float32 and the
        pixel mask (pages, images, H, W), zero padded to the largest, on the device."""
        count = max(len(images) for images in pages)
        height = max(image.shape[0] for images in pages for image in images)
        width = max(image.shape[1] for images in pages for image in images)
        pixels = np.zeros((len(pages), count, height, width, 3), dtype=np.uint8)
        mask = np.zeros((len(pages), count, height, width), dtype=bool)
        for i, images in enumerate(pages):
            for j, image in enumerate(images):
                h, w = image.shape[:2]
                pixels[i, j, :h, :w] = image
                mask[i, j, :h, :w] = True
        pixels_on_device, mask_on_device = (self._to_device(torch.from_numpy(array)) for array in (pixels, mask))
        pixels_on_device = pixels_on_device.permute(0, 1, 4, 2, 3)  # (pages, images, 3, H, W)
        values = torch.empty(pixels_on_device.shape, dtype=torch.float32, device=self.device)
        for i in range(len(pages)):  # a page and a channel at a time: the int64 indices stay small
            for channel in range(3):
                values[i, :, channel] = torch.take(self.table[channel], pixels_on_device[i, :, channel].long())
        values.masked_fill_(~mask_on_device[:, :, None], 0.0)
        return values, mask_on_device

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Host to device; from pinned memory on a GPU, so the copy does not wait on pageable memory."""
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)


class ModelAdapter(ABC):
    """One model family behind the interface the pipeline uses: ``load``, ``prompt``, ``answer``.

    Subclasses prepare inputs (``prompt``, ``tokenize``, ``_encode``, ``_generation_inputs``) and name their
    model class; families whose decoding needs nothing but the KV cache (``_decode_step``) are decoded with
    continuous batching (``actors.decoding``), the others with transformers' ``generate``. Batching, memory
    handling, stop rules and confidences are shared."""

    info: ClassVar[FamilyInfo]
    model_class: ClassVar[str]  # transformers class that loads the checkpoint
    slot_decoding: ClassVar[bool] = False  # whether ``_decode_step`` is implemented

    def __init__(self, model: Any, processor: Any, geometry: ImageGeometry, model_config: ModelConfig) -> None:
        """From a loaded model and processor (the benchmarks build full-size models in memory); ``load``
        loads a checkpoint."""
        self.model = model.eval()
        self.processor = processor
        self.geometry = geometry
        self.device = next(model.parameters()).device
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.normalizer = PixelNormalizer(geometry, self.device)
        self.prompt_format = self.resolve_prompt_format(model_config, processor)
        self.stop_at_newline = (
            self.prompt_format == "raw" if model_config.stop_at_newline is None else model_config.stop_at_newline
        )
        stop = [self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)]
        self.stop_token_ids = sorted(set(stop + (newline_token_ids(self.tokenizer) if self.stop_at_newline else [])))
        self.answer_stop_ids = stop  # what a grammar lets an answer end with
        self._grammars: Grammars | None = None
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.decoder = (
            SlotDecoder(
                self._decode_step,
                self._kv_shapes(),
                self.model.dtype,
                self.device,
                model_config.cuda_graphs,
                model_config.decode_slots,
            )
            if self.slot_decoding and model_config.continuous_batching
            else None
        )

    @property
    def grammars(self) -> Grammars:
        """The constraints of typed questions, compiled for this tokenizer (built when first needed)."""
        if self._grammars is None:
            vocab_size = self.model.config.get_text_config().vocab_size
            self._grammars = Grammars(self.tokenizer, vocab_size, self.answer_stop_ids)
        return self._grammars

    @classmethod
    def load(cls, model: ModelConfig, geometry: ImageGeometry, device: torch.device) -> ModelAdapter:
        import transformers

        loaded, processor = load_pretrained(model, getattr(transformers, cls.model_class), device, geometry)
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

    @classmethod
    def prompt_template(cls, prompt_format: str) -> str:
        """The prompt of ``prompt_format`` with a ``{question}`` field, as this family writes it (what
        `docqa models` shows)."""
        return cls.info.prompt_formats[prompt_format]

    def prompt(self, question: str) -> str:
        """The model prompt for a question about one page, in this checkpoint's format."""
        return self.prompt_template(self.prompt_format).format(question=question)

    @abstractmethod
    def _encode(self, pages: list[list[np.ndarray]]) -> list[torch.Tensor]:
        """Image features of each page (its sub-images through the vision encoder and perceiver)."""

    @abstractmethod
    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        """The token ids of each prompt, as the family's processor lays them out (image tokens included)."""

    @abstractmethod
    def _generation_inputs(
        self, token_lists: list[list[int]], pages: list[int], features: list[torch.Tensor]
    ) -> dict[str, Any]:
        """Model keyword arguments for tokenized prompts, prompt i about the page whose image features are
        ``features[pages[i]]``: ``input_ids`` and ``attention_mask`` (left padded), and ``cache`` when a
        prefix of them is already in one."""

    def _decode_step(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """Next-token logits of one token per row from the KV cache alone (families with ``slot_decoding``)."""
        raise NotImplementedError

    def _kv_shapes(self) -> list[tuple[int, int]]:
        """(key/value heads, head dim) of each language-model layer."""
        text = self.model.config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return [(text.num_key_value_heads, head_dim)] * text.num_hidden_layers

    def left_padded(self, token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and attention_mask of token lists, left padded, on the device."""
        width = max(len(tokens) for tokens in token_lists)
        input_ids = torch.full((len(token_lists), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, tokens in enumerate(token_lists):
            input_ids[row, width - len(tokens) :] = torch.tensor(tokens)
            attention_mask[row, width - len(tokens) :] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    @torch.inference_mode()
    def encode_pages(self, pages: list[list[np.ndarray]]) -> list[torch.Tensor]:
        """Image features, once per page. Pages are encoded in groups of the same padded size: images of a
        call are padded to the largest, so a portrait page beside a landscape one would double the work."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, images in enumerate(pages):
            groups[max(image.shape[0] for image in images), max(image.shape[1] for image in images)].append(index)
        features: list[torch.Tensor | None] = [None] * len(pages)
        for indices in groups.values():
            pages_per_call = max(1, ENCODER_IMAGES // max(len(pages[i]) for i in indices))
            for first in range(0, len(indices), pages_per_call):
                chunk = indices[first : first + pages_per_call]
                encoded = split_on_out_of_memory(self._encode, [pages[i] for i in chunk])
                for index, page_features in zip(chunk, encoded, strict=True):
                    features[index] = page_features
        return [page_features for page_features in features if page_features is not None]

    def pixel_batch(self, pages: list[list[np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values (pages, images, 3, H, W) in the model's dtype and the pixel mask, on the device."""
        values, mask = self.normalizer.batch(pages)
        return values.to(self.model.dtype), mask

    def _answer_of(self, tokens: list[int], probabilities: list[float], model_ms: float) -> Answer:
        """Decode generated tokens up to the first stop token (included in the count)."""
        length = next((i + 1 for i, token in enumerate(tokens) if token in self.stop_token_ids), len(tokens))
        text = self.tokenizer.decode(tokens[:length], skip_special_tokens=True)
        if self.stop_at_newline:
            text = text.split("\n", 1)[0]
        return Answer(text.strip(), length, float(np.mean(probabilities[:length])), model_ms)

    @torch.inference_mode()
    def generate(
        self,
        token_lists: list[list[int]],
        pages: list[int],
        features: list[torch.Tensor],
        max_new_tokens: int,
        fixed_length: bool = False,
        constraint: Constraint | None = None,
    ) -> list[Answer]:
        """transformers' batched greedy ``generate``, prompt i about page ``pages[i]`` from its precomputed
        image features, every answer under ``constraint`` if given; decodes new tokens only. ``fixed_length``
        forces max_new_tokens tokens (benchmarks of random-weight models, which never stop)."""
        started = time.perf_counter()
        inputs = self._generation_inputs(token_lists, pages, features)
        processors = [self.grammars.logits_processor(constraint, len(token_lists))] if constraint else None
        output = self.model.generate(
            **inputs,
            logits_processor=processors,
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
        token_probs = step_logits.softmax(-1).gather(-1, new_tokens[:, :, None]).squeeze(-1).cpu().tolist()
        return [
            self._answer_of(tokens, probabilities, elapsed_ms)
            for tokens, probabilities in zip(new_tokens.cpu().tolist(), token_probs, strict=True)
        ]

    @torch.inference_mode()
    def _prefill(self, inputs: dict[str, Any]) -> Prefilled:
        """The first step of ``generate``: the prompts' tokens not yet in ``inputs``' cache through the model
        (position ids follow the attention mask), their KV cache and next-token logits."""
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        cache = inputs.get("cache")
        cached = cache.get_seq_length() if cache is not None else 0
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(attention_mask == 0, 1)
        extra = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask", "cache")}
        output = self.model(
            input_ids=input_ids[:, cached:],
            attention_mask=attention_mask,
            position_ids=position_ids[:, cached:],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        return Prefilled(output.cache, attention_mask, output.logits[:, -1].float())

    def decode_in_slots(
        self, token_lists: list[list[int]], prompts: list[Prompt], features: list[torch.Tensor], fixed_length: bool
    ) -> list[Answer]:
        """Continuous batching (``actors.decoding``) of tokenized prompts, each to its own length cap."""
        if self.decoder is None:
            raise RuntimeError("continuous batching is off (model.continuous_batching) or not supported by this family")
        requests = [
            DecodeRequest(
                len(tokens),
                prompt.max_new_tokens,
                prompt.max_new_tokens if fixed_length else 0,
                self.grammars.matcher(prompt.constraint) if prompt.constraint else None,
            )
            for tokens, prompt in zip(token_lists, prompts, strict=True)
        ]

        def prefill(indices: list[int]) -> Prefilled:
            pages = [prompts[i].page for i in indices]
            return self._prefill(self._generation_inputs([token_lists[i] for i in indices], pages, features))

        decoded = self.decoder.run(requests, prefill, self.stop_token_ids)
        return [self._answer_of(d.tokens, d.probabilities, d.milliseconds) for d in decoded]

    def _uses_slots(self, token_lists: list[list[int]], prompts: list[Prompt]) -> bool:
        """Continuous batching, unless an answer could reach past the model's sliding attention window
        (there each row would see more than the model was built to)."""
        if self.decoder is None:
            return False
        window = getattr(self.model.config.get_text_config(), "sliding_window", None)
        longest = max(len(tokens) for tokens in token_lists) + max(prompt.max_new_tokens for prompt in prompts)
        return window is None or longest <= window

    def answer(self, pages: list[list[np.ndarray]], prompts: list[Prompt], fixed_length: bool = False) -> list[Answer]:
        """Answer every prompt (in order) about its page; each page goes through the vision encoder once.
        With continuous batching all prompts are decoded together, each to its own length and under its own
        grammar; else prompts with the same length cap and grammar share one ``generate`` call. Either way
        a batch that runs out of GPU memory is answered in halves."""
        if not prompts:
            return []
        started = time.perf_counter()
        features = self.encode_pages(pages)
        encode_ms_per_page = (time.perf_counter() - started) * 1000 / max(len(pages), 1)
        token_lists = self.tokenize([prompt.text for prompt in prompts])
        slots = self._uses_slots(token_lists, prompts)

        def run(chunk: list[int]) -> list[Answer]:
            chunk_tokens, chunk_prompts = [token_lists[i] for i in chunk], [prompts[i] for i in chunk]
            if slots:
                return self.decode_in_slots(chunk_tokens, chunk_prompts, features, fixed_length)
            pages = [prompt.page for prompt in chunk_prompts]
            first = chunk_prompts[0]
            return self.generate(chunk_tokens, pages, features, first.max_new_tokens, fixed_length, first.constraint)

        # generate: one call per length cap and constraint; continuous batching: one for all
        groups: dict[tuple[int, Constraint | None], list[int]] = defaultdict(list)
        for index, prompt in enumerate(prompts):
            groups[(0, None) if slots else (prompt.max_new_tokens, prompt.constraint)].append(index)
        answers: list[Answer | None] = [None] * len(prompts)
        for indices in groups.values():
            for index, answer in zip(indices, split_on_out_of_memory(run, indices), strict=True):
                answers[index] = Answer(
                    answer.text, answer.generated_tokens, answer.confidence, answer.model_ms + encode_ms_per_page
                )
        return [answer for answer in answers if answer is not None]
