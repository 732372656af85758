"""The driver's look at the checkpoint (actors/families.py ``inspect_checkpoint``), taken in a child process:
transformers imports torch (about 0.4 GiB resident and seconds of start-up), which the driver needs for nothing
else and would keep for the whole run. This module imports neither, so the child starts light."""

from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from actors.checkpoint import CheckpointInfo, ModelLoadError
from pipeline.config import JobConfig, ModelConfig, RenderConfig


def _inspect(model: ModelConfig, render: RenderConfig) -> CheckpointInfo:
    from actors.families import inspect_checkpoint

    return inspect_checkpoint(model, render)


def inspect_checkpoint_aside(config: JobConfig) -> CheckpointInfo:
    """What the driver learns of the checkpoint, from a child process unless this one has transformers loaded
    already (nothing to spare then); the child's errors (ConfigError, ModelLoadError) come back as they
    were raised."""
    if "transformers" in sys.modules:
        return _inspect(config.model, config.render)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(_inspect, config.model, config.render).result()
        except BrokenProcessPool as error:
            raise ModelLoadError(f"inspecting the checkpoint {config.model.id} killed its process: {error}") from None
