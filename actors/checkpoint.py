"""What the driver learns from a checkpoint before any work starts (``CheckpointInfo``: its family, its
commit and its image processor's geometry; actors/families.py ``inspect_checkpoint`` reads it once through
transformers, ``read_checkpoint`` from the checkpoint's own files when they say it all), or a clear error
(``ModelLoadError``) saying how to fix the model setting. The actors get the result, load the weights without
inspecting the checkpoint again, and check that their image processor agrees with it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from PIL.Image import Resampling

from actors.catalog import FAMILIES
from pipeline.config import ConfigError, ModelConfig, RenderConfig
from pipeline.images import ImageGeometry

# The image processor settings the geometry is made of (``image_geometry``). A checkpoint whose processor file
# leaves one of them to the processor class's defaults is read by transformers, which knows those defaults.
GEOMETRY_SETTINGS = (
    "size",
    "do_resize",
    "do_rescale",
    "do_normalize",
    "resample",
    "rescale_factor",
    "image_mean",
    "image_std",
    "do_image_splitting",
)


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


def checkpoint_json(directory: Path, filename: str) -> dict[str, Any] | None:
    """One JSON file of a checkpoint's directory, None if it has none."""
    path = directory / filename
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_checkpoint(model: ModelConfig, render: RenderConfig) -> CheckpointInfo | None:
    """What ``inspect_checkpoint`` would learn of an image-splitting family's checkpoint in a local directory,
    read from its config.json (its ``model_type`` only: the actors load the rest) and its image processor's
    settings (processor_config.json's, else preprocessor_config.json, the order transformers reads them in)
    without importing transformers: its processor classes import torch, ~4 CPU-s before a run's first task.
    None whenever the files leave anything to transformers: a Hub id (resolving its revision asks the Hub,
    which can take a minute to fail), a setting left to the class's defaults (absent or null), a size of
    other keys (transformers has rules for those), another processor class, a quantization or an adapter to
    check, a file that cannot be read. The caller then asks transformers, which also words the errors."""
    if not os.path.isdir(model.id) or model.quantization != "none" or model.adapter:  # isdir, as transformers
        return None
    directory = Path(model.id)
    try:
        family = FAMILIES.get((checkpoint_json(directory, "config.json") or {}).get("model_type"))
        if family is None or not family.image_splitting:  # Idefics1's files name their size otherwise
            return None
        processor = checkpoint_json(directory, "processor_config.json") or {}
        settings = processor.get("image_processor")  # a nested entry first, even an empty one, as transformers
        if settings is None:
            settings = checkpoint_json(directory, "preprocessor_config.json") or {}
        if any(settings.get(name) is None for name in GEOMETRY_SETTINGS):
            return None
        if settings.get("image_processor_type") != family.image_processor:
            return None
        if set(settings["size"]) != {"longest_edge", "shortest_edge"}:  # the image-splitting families' size
            return None
        geometry = image_geometry(SimpleNamespace(**settings), render.image_splitting, model.id)
    except Exception:  # noqa: BLE001 - transformers reads the checkpoint again and says what is wrong
        return None
    return CheckpointInfo(family.model_type, family.name, None, geometry)  # as inspect_checkpoint: no commit


def processor_geometry(model: ModelConfig, render: RenderConfig) -> ImageGeometry:
    """The geometry of the checkpoint's image processor (its directory checked by the caller)."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(model.id, revision=model.revision)
    except Exception as error:
        raise ModelLoadError(model_load_hint(model.id, error)) from error
    return image_geometry(processor, render.image_splitting, model.id)


def image_geometry(processor: Any, image_splitting: bool | None, model_id: str = "model") -> ImageGeometry:
    """The geometry of an Idefics2 or Idefics1 image processor (loaded, or its settings as read from its file:
    anything with these attributes); ``image_splitting`` None keeps its setting (Idefics1 has none: asking for
    it is an error)."""
    size = dict(processor.size) if isinstance(processor.size, dict) else processor.size.__dict__
    square = bool(size.get("height")) and size.get("height") == size.get("width")
    longest = size.get("height") if square else size.get("longest_edge")
    shortest = size.get("height") if square else size.get("shortest_edge")
    resample = Resampling.BICUBIC if square else Resampling.BILINEAR  # transformers' PILImageResampling
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
