"""The supported model families, told apart by the checkpoint's model_type; the one place that maps a
checkpoint to its adapter."""

from __future__ import annotations

import os
from typing import Any

import torch

from actors.adapters import ModelAdapter
from actors.catalog import family_of
from actors.checkpoint import CheckpointInfo, ModelLoadError, check_model_directory, model_load_hint, processor_geometry
from actors.idefics1 import IdeficsAdapter
from actors.idefics2 import Idefics2Adapter
from pipeline.config import ConfigError, ModelConfig, RenderConfig
from pipeline.images import ImageGeometry

ADAPTERS: dict[str, type[ModelAdapter]] = {a.info.model_type: a for a in [Idefics2Adapter, IdeficsAdapter]}


def adapter_class(model_type: str, model_id: str) -> type[ModelAdapter]:
    return ADAPTERS[family_of(model_type, model_id).model_type]


def checkpoint_config(model: ModelConfig) -> tuple[Any, str | None]:
    """The checkpoint's config.json (its model_type names the family) and, for a Hub id, the commit its
    revision resolved to: the snapshot the file was read from (transformers 5 no longer sets the config's
    ``_commit_hash``). A local directory has none. Its directory checked by the caller."""
    from transformers import AutoConfig
    from transformers.utils.hub import cached_file, extract_commit_hash

    try:
        config = AutoConfig.from_pretrained(model.id, revision=model.revision)
        if os.path.isdir(model.id):
            return config, None
        return config, extract_commit_hash(cached_file(model.id, "config.json", revision=model.revision), None)
    except Exception as error:
        raise ModelLoadError(model_load_hint(model.id, error)) from error


def inspect_checkpoint(model: ModelConfig, render: RenderConfig) -> CheckpointInfo:
    """What the driver learns of the checkpoint before any work, once (its directory, its config.json, its
    adapter and its image processor): fails if it is of no supported family or asks for what its family
    cannot do."""
    check_model_directory(model.id)
    checkpoint, commit = checkpoint_config(model)
    info = adapter_class(checkpoint.model_type, model.id).info
    if model.quantization != "none" and model.quantization not in info.quantization:
        raise ConfigError(f"model.quantization={model.quantization} is not available for {info.name} checkpoints")
    quantized = getattr(checkpoint, "quantization_config", None) or {}
    method = quantized.get("quant_method") if isinstance(quantized, dict) else getattr(quantized, "quant_method", None)
    if model.quantization == "awq" and str(method).lower() != "awq":
        raise ConfigError(
            f"model.quantization=awq needs an AWQ checkpoint (HuggingFaceM4/idefics2-8b-AWQ); {model.id} is not one"
        )
    if model.adapter:
        from peft import PeftConfig

        try:
            PeftConfig.from_pretrained(model.adapter, revision=model.adapter_revision)
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
            raise ModelLoadError(f"cannot load model.adapter {model.adapter!r}: {reason}") from error
    return CheckpointInfo(info.model_type, info.name, commit, processor_geometry(model, render))


def describe_families() -> str:
    """The text of `docqa models`."""
    lines = []
    for adapter in ADAPTERS.values():
        info = adapter.info
        lines += [
            f"{info.name}  (model_type {info.model_type}: {info.classes})",
            "  prompt formats (model.prompt_format), after the tokenizer's BOS token:",
            *[f"    {name:<5} {adapter.prompt_template(name)!r}" for name in info.prompt_formats],
            "    raw answers end at the first newline (model.stop_at_newline)",
            f"  image splitting: {'yes, 4 crops + the page' if info.image_splitting else 'no, one square image'}",
            f"  quantization (model.quantization, GPU only): {', '.join(info.quantization)}",
            "  adapters: PEFT LoRA / QLoRA on top of model.id (model.adapter)",
            "  checkpoints:",
            *[f"    {c.id:<36} {c.prompt_format:<5} {c.note}" for c in info.checkpoints],
            "",
        ]
    return "\n".join(lines).rstrip()


def load_adapter(model: ModelConfig, model_type: str, geometry: ImageGeometry, device: torch.device) -> ModelAdapter:
    """The adapter of the checkpoint's family (``model_type``, as the driver found it), loaded on ``device``."""
    return adapter_class(model_type, model.id).load(model, geometry, device)
