"""What the driver learns from a checkpoint before any work starts (``CheckpointInfo``: its family, its
commit and its image processor's geometry; actors/families.py ``inspect_checkpoint`` reads it once), or a
clear error (``ModelLoadError``) saying how to fix the model setting. The actors get the result, and load
the weights without inspecting the checkpoint again."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, ModelConfig, RenderConfig
from pipeline.images import ImageGeometry


@dataclass(frozen=True)
class CheckpointInfo:
    """What the driver learnt of the checkpoint, handed to every actor."""

    model_type: str  # config.json's model_type: the family whose adapter loads it
    family: str  # the family's name, as `docqa models` shows it
    commit: str | None  # the Hub commit the revision resolved to, when known
    geometry: ImageGeometry


class ModelLoadError(RuntimeError):
    """The checkpoint (or its processor) could not be loaded; the message says how to fix it."""


def model_load_hint(model_id: str, error: Exception) -> str:
    return (
        f"cannot load model {model_id!r}: {type(error).__name__}: {error}\n"
        "If this machine has no access to the Hugging Face Hub, download the checkpoint elsewhere and pass its "
        "local directory with --model PATH (or model.id in the config), or build the offline test model with "
        "`docqa model tiny PATH` and pass --model PATH."
    )


def check_model_directory(model_id: str) -> None:
    """A model id written as a path (absolute, ./, ../; ModelConfig expands ~) must be a directory:
    transformers takes a missing one for a Hub id and reports a malformed repo id instead."""
    if model_id.startswith(("/", "./", "../")) and not Path(model_id).is_dir():
        raise ModelLoadError(f"cannot load model {model_id!r}: no such directory: {model_id}")


def processor_geometry(model: ModelConfig, render: RenderConfig) -> ImageGeometry:
    """The geometry of the checkpoint's image processor (its directory checked by the caller)."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(model.id, revision=model.revision)
    except Exception as error:
        raise ModelLoadError(model_load_hint(model.id, error)) from error
    return image_geometry(processor, render.image_splitting, model.id)


def image_geometry(processor: Any, image_splitting: bool | None, model_id: str = "model") -> ImageGeometry:
    """The geometry of a loaded Idefics2 or Idefics1 image processor; ``image_splitting`` None keeps its
    setting (Idefics1 has none: asking for it is an error)."""
    from transformers.image_utils import PILImageResampling

    size = dict(processor.size) if isinstance(processor.size, dict) else processor.size.__dict__
    square = bool(size.get("height")) and size.get("height") == size.get("width")
    longest = size.get("height") if square else size.get("longest_edge")
    shortest = size.get("height") if square else size.get("shortest_edge")
    resample = PILImageResampling.BICUBIC if square else PILImageResampling.BILINEAR
    unsupported = [
        name
        for name, ok in [
            ("do_resize", processor.do_resize),
            ("do_rescale", processor.do_rescale),
            ("do_normalize", processor.do_normalize),
            (f"resample={resample.name.lower()}", processor.resample in (resample, resample.value, None)),
        ]
        if not ok
    ]
    if not longest or not shortest or unsupported:
        raise ModelLoadError(f"{model_id}: unsupported image processor settings {unsupported or size}")
    if square and image_splitting:
        raise ConfigError(
            f"{model_id} is an Idefics1 checkpoint, which has no image splitting: leave render.image_splitting "
            "unset or set it to false"
        )
    splitting = False if square else processor.do_image_splitting if image_splitting is None else image_splitting
    mean, std = processor.image_mean, processor.image_std
    return ImageGeometry(
        longest_edge=int(longest),
        shortest_edge=int(shortest),
        splitting=bool(splitting),
        rescale_factor=float(processor.rescale_factor),
        mean=tuple(float(v) for v in (mean if isinstance(mean, (list, tuple)) else [mean] * 3)),
        std=tuple(float(v) for v in (std if isinstance(std, (list, tuple)) else [std] * 3)),
        square=square,
    )
