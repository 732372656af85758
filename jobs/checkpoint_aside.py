"""The driver's look at the checkpoint. When the checkpoint's own files say all it needs (its config.json and
its image processor's every setting: actors/checkpoint.py ``read_checkpoint``), the driver reads them, in
milliseconds. Otherwise transformers inspects it (actors/families.py ``inspect_checkpoint``) in a child
process: transformers imports torch (about 0.4 GiB resident and ~4 CPU-s of start-up), which the driver needs
for nothing else and would keep for the whole run. This module imports neither, so the child starts light; it
starts first, and the driver checks the input and starts Ray meanwhile (``CheckpointInspection``). A process
and a pipe rather than concurrent.futures' ProcessPoolExecutor (used before): a run that fails before it needs
the answer must stop the child, and a pool cannot stop a task that has started.
"""

from __future__ import annotations

import multiprocessing
import sys
from multiprocessing.connection import Connection
from typing import Any

from actors.checkpoint import CheckpointInfo, ModelLoadError, read_checkpoint
from pipeline.config import JobConfig, ModelConfig, RenderConfig


def _inspect(model: ModelConfig, render: RenderConfig) -> CheckpointInfo:
    from actors.families import inspect_checkpoint

    return inspect_checkpoint(model, render)


def _inspect_into(connection: Connection, model: ModelConfig, render: RenderConfig) -> None:
    """The child's work: what it learnt, or the error it raised, sent back whole."""
    try:
        outcome: tuple[bool, Any] = (True, _inspect(model, render))
    except BaseException as error:  # noqa: BLE001 - the parent raises it as it was raised
        outcome = (False, error)
    connection.send(outcome)


class CheckpointInspection:
    """What the driver learns of the checkpoint: read from its files at once, or else started at once in a
    child process (in this one if it has transformers loaded already: nothing to spare then) and waited for
    by ``result``; the child's errors (ConfigError, ModelLoadError) come back as they were raised. ``cancel``
    stops a child no one waits for."""

    def __init__(self, config: JobConfig) -> None:
        self.config = config
        self.process: Any = None
        self.read = read_checkpoint(config.model, config.render)
        if self.read is not None or "transformers" in sys.modules:
            return
        context = multiprocessing.get_context("spawn")
        self.answers, child_end = context.Pipe(duplex=False)
        # A daemon: a driver that exits (an error, Ctrl-C) before it waits for the answer never waits for the child.
        self.process = context.Process(target=_inspect_into, args=(child_end, config.model, config.render), daemon=True)
        self.process.start()
        child_end.close()

    def result(self) -> CheckpointInfo:
        if self.read is not None:
            return self.read
        if self.process is None:
            return _inspect(self.config.model, self.config.render)
        try:
            ok, value = self.answers.recv()
        except EOFError:
            self.process.join()
            model, code = self.config.model.id, self.process.exitcode
            raise ModelLoadError(f"inspecting the checkpoint {model} killed its process (exit code {code})") from None
        finally:
            self.answers.close()
        self.process.join()
        if not ok:
            raise value
        return value

    def cancel(self) -> None:
        if self.process is None:
            return
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.answers.close()
