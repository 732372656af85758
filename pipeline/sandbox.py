"""The parent's side of the render helper (pipeline/render_helper.py): opening and rendering documents in a
helper process that can be killed.

MuPDF and poppler have no timeouts and can loop or allocate without bound on crafted files. Each worker
process keeps one helper (started once, reused across documents) that runs under an address-space limit
(RLIMIT_AS); every call carries the document's wall-clock deadline. A helper that misses the deadline is
killed and replaced (the document gets ``timeout``); one that dies or runs out of memory is replaced too
(``memory_limit`` or ``render_error``). The rest of the run never notices.

The helper is the one process that parses hostile bytes, so it holds nothing worth stealing: it starts with
a minimal environment (no credentials, tokens or proxy settings), in a private temporary directory, and
before it reads a byte it sets no-new-privileges and loads a seccomp filter (pyseccomp over libseccomp)
that refuses every socket but a Unix one, so it can reach no network and no instance-metadata endpoint.
Where the filter cannot be loaded it logs once that isolation is reduced; every helper reports what was in
force, and the run record lists it.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import LimitsConfig, RenderConfig
from pipeline.records import DocumentError, Status
from pipeline.render_helper import PIXEL_BUFFER_BYTES, SHARED

if TYPE_CHECKING:
    from pipeline.pdf import TextLayer

# The only variables of the worker's environment the helper gets (poppler's pdftoppm is found on PATH).
PASSED_ENVIRONMENT = ("PATH", "LANG", "LC_ALL", "LD_LIBRARY_PATH")
START_TIMEOUT_S = 60.0

log = logging.getLogger(__name__)


class RenderSandbox:
    """The parent's side: start the helper, call it with a deadline, replace it when it fails."""

    def __init__(self, memory_mb: int) -> None:
        self.memory_bytes = memory_mb * 1024 * 1024
        self._start()

    def _start(self) -> None:
        """A fresh interpreter (never a fork of a multi-threaded Ray worker, nor a re-import of its main
        module) in its own session, so that killing it also ends any poppler process it started; with a
        minimal environment and a private temporary directory. Waits for its isolation report."""
        child_reads, parent_writes = os.pipe()
        parent_reads, child_writes = os.pipe()
        pixels_fd = os.memfd_create("docqa-render-pixels")
        os.ftruncate(pixels_fd, PIXEL_BUFFER_BYTES)
        self.pixels = np.frombuffer(mmap.mmap(pixels_fd, PIXEL_BUFFER_BYTES), dtype=np.uint8)
        self.private_dir = tempfile.mkdtemp(prefix="docqa-render-")
        self._remove_private_dir = weakref.finalize(self, shutil.rmtree, self.private_dir, True)
        code = (
            f"from pipeline.render_helper import serve; "
            f"serve({child_reads}, {child_writes}, {self.memory_bytes}, {pixels_fd})"
        )
        self._process = subprocess.Popen(
            [sys.executable, "-c", code],
            pass_fds=(child_reads, child_writes, pixels_fd),
            stdin=subprocess.DEVNULL,
            env=helper_environment(self.private_dir),
            cwd=self.private_dir,
            start_new_session=True,
        )
        for fd in (child_reads, child_writes, pixels_fd):
            os.close(fd)
        self._requests = Connection(parent_writes, readable=False)
        self._connection = Connection(parent_reads, writable=False)
        self.isolation = self._receive("start", time.monotonic() + START_TIMEOUT_S)
        self.started_at = time.monotonic()
        if not self.isolation["network"].startswith("closed"):
            _log_reduced_isolation(self.isolation["network"])

    @property
    def process_id(self) -> int:
        return self._process.pid

    def _kill(self) -> None:
        """End the helper (and any poppler process it started), its pipes and its private directory."""
        try:
            os.killpg(self._process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._process.wait(timeout=30)
        self._requests.close()
        self._connection.close()
        self._remove_private_dir()

    def _replace(self) -> None:
        self._kill()
        self._start()

    def _receive(self, operation: str, deadline: float) -> Any:
        """The helper's answer by the deadline; a helper that misses it or dies is replaced."""
        try:
            ready = self._connection.poll(max(0.0, deadline - time.monotonic()))
        except (BrokenPipeError, OSError):
            ready = True  # the helper is gone; recv below reports it
        if not ready and operation == "start":  # no new helper in turn: the next document tries again
            self._kill()
            raise DocumentError(Status.RENDER_ERROR, f"the renderer did not start within {START_TIMEOUT_S:.0f} s")
        if not ready:
            self._replace()
            raise DocumentError(Status.TIMEOUT, f"{operation} did not finish within the document's time limit")
        try:
            answer = self._connection.recv()
        except (EOFError, OSError):
            code = self._process.poll()
            if operation == "start":
                raise DocumentError(Status.RENDER_ERROR, f"the renderer did not start (exit code {code})") from None
            self._replace()
            raise DocumentError(
                Status.RENDER_ERROR, f"the renderer died during {operation} (exit code {code})"
            ) from None
        kind, value = answer
        if kind == "ok":
            return value
        if not isinstance(value, DocumentError):
            raise RuntimeError(value)  # an unexpected exception in the helper, as text
        if value.status == Status.MEMORY_LIMIT:
            self._replace()  # its heap may be fragmented or half-initialised: start clean
            raise DocumentError(Status.MEMORY_LIMIT, f"{operation} needed more than the memory limit: {value}")
        raise value

    def ensure_running(self) -> None:
        """Start the helper again if it died between calls (killed from outside, or its replacement never
        started): not the next call's fault, so a fresh helper takes it."""
        if self._process.poll() is not None:
            self._replace()

    def call(self, operation: str, arguments: tuple[Any, ...], deadline: float) -> Any:
        """Run one operation in the helper; raises DocumentError as the helper reported it, or with the
        status of a helper that missed the deadline (timeout), ran out of memory or died."""
        self.ensure_running()
        try:
            self._requests.send((operation, arguments))
        except (BrokenPipeError, OSError):
            pass  # the helper is gone; _receive reports it
        return self._receive(operation, deadline)


def helper_environment(private_dir: str) -> dict[str, str]:
    """The helper's whole environment: a few harmless variables of the worker's, and its private directory
    as home and temporary directory."""
    environment = {name: os.environ[name] for name in PASSED_ENVIRONMENT if name in os.environ}
    return {
        **environment,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path]),
        "HOME": private_dir,
        "TMPDIR": private_dir,
        "PYTHONDONTWRITEBYTECODE": "1",
    }


@functools.cache
def _log_reduced_isolation(network: str) -> None:
    """Once per process and reason."""
    log.warning("render isolation reduced: the helper's network is %s", network)


_SANDBOXES: dict[int, RenderSandbox] = {}


def sandbox(memory_mb: int) -> RenderSandbox:
    """This process's sandbox for a memory limit, started on first use and reused afterwards; its helper
    running when it is returned."""
    if memory_mb not in _SANDBOXES:
        _SANDBOXES[memory_mb] = RenderSandbox(memory_mb)
    _SANDBOXES[memory_mb].ensure_running()
    return _SANDBOXES[memory_mb]


class SandboxedDocument:
    """A PdfDocument whose every call runs in the sandbox under one deadline for the whole document."""

    def __init__(self, data: bytes, backend: str, passwords: tuple[str, ...], memory_mb: int, timeout_s: float):
        self.sandbox = sandbox(memory_mb)  # running first: the helper's start-up is not the document's time
        self.deadline = time.monotonic() + timeout_s
        self.num_pages, self.repaired = self.sandbox.call("open", (data, backend, passwords), self.deadline)

    def page_size(self, page_number: int) -> tuple[float, float]:
        return tuple(self.sandbox.call("page_size", (page_number,), self.deadline))

    def text_layer(self, page_number: int) -> TextLayer:
        return self.sandbox.call("text_layer", (page_number,), self.deadline)

    def render(self, page_number: int, longest_edge: int) -> np.ndarray:
        buffer, shape = self.sandbox.call("render", (page_number, longest_edge), self.deadline)
        if buffer == SHARED:  # copied out: the next render reuses the buffer
            return self.sandbox.pixels[: int(np.prod(shape))].reshape(shape).copy()
        return np.frombuffer(buffer, dtype=np.uint8).reshape(shape)

    def close(self) -> None:
        try:
            self.sandbox.call("close", (), time.monotonic() + 10)
        except DocumentError:
            pass  # the helper was replaced; nothing is left open


def open_document(
    data: bytes,
    render: RenderConfig,
    limits: LimitsConfig,
    on_helper: Callable[[RenderSandbox], None] = lambda _: None,
) -> SandboxedDocument:
    """``data`` opened in this process's helper, under the limits of one unit; raises DocumentError (a
    parser's own exception is ``corrupt``). ``on_helper`` hears of the helper that opened it (its isolation)."""
    try:
        opened = SandboxedDocument(
            data,
            render.backend,
            tuple(password.get_secret_value() for password in render.passwords),
            limits.render_memory_mb,
            limits.document_timeout_s,
        )
    except DocumentError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever a hostile file makes the parser raise
        raise DocumentError(Status.CORRUPT, f"cannot open it: {type(error).__name__}: {error}") from None
    on_helper(opened.sandbox)
    return opened
