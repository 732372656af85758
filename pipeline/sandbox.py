"""The parent's side of the render helper (pipeline/render_helper.py): opening and rendering documents in a
helper process that can be killed, and that can reach nothing worth having.

MuPDF and poppler have no timeouts and can loop or allocate without bound on crafted files. Each worker
thread keeps one helper per memory limit and backend (started once, reused across documents) under an
address-space limit; every call carries the document's wall-clock deadline, and so does every read of the
helper's answer. A helper that sends nothing by the deadline is killed and replaced (the document gets
``timeout``); one that dies, runs out of memory, stops mid-message or answers anything the protocol does not
allow (pipeline/helper_protocol.py) is replaced too (``render_error`` or ``memory_limit``). The rest of the
run never notices.

The helper is the one process that parses hostile bytes, so it holds nothing worth stealing and reaches
nothing: it starts under bubblewrap (pipeline/confinement.py: its own user, PID, network, IPC and UTS
namespaces, a read-only root of what the interpreter needs, a private /tmp, killed with its parent) with a
minimal environment (no credentials, tokens or proxy settings), and confines itself further before it reads
a byte (seccomp, resource limits); under ``render.isolation: strict`` a helper whose seccomp filter did not
load is refused. Its answers are msgpack frames, checked field by field: nothing it sends
is executed. Every helper reports what was in force, and the run record lists it.
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
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import LimitsConfig, RenderConfig
from pipeline.confinement import SECCOMP_HINT, IsolationUnavailable, confinement
from pipeline.helper_protocol import (
    MAX_ANSWER_BYTES,
    HelperException,
    ProtocolError,
    checked_answer,
    read_frame,
    write_frame,
)
from pipeline.records import DocumentError, Status
from pipeline.render_helper import PIXEL_BUFFER_BYTES
from pipeline.words import TextLayer

# The only variables of the worker's environment the helper gets (poppler's pdftoppm is found on PATH).
PASSED_ENVIRONMENT = ("PATH", "LANG", "LC_ALL", "LD_LIBRARY_PATH")
START_TIMEOUT_S = 60.0
CLOSE_TIMEOUT_S = 10.0
EXEC_BACKENDS = ("pdf2image",)  # backends whose helper runs other programs (poppler's pdftoppm, pdfinfo)

log = logging.getLogger(__name__)


def helper_environment() -> dict[str, str]:
    """The helper's whole environment: a few harmless variables of the worker's, /tmp (its private tmpfs) as
    home and temporary directory, and the path to docqa's pipeline package."""
    environment = {name: os.environ[name] for name in PASSED_ENVIRONMENT if name in os.environ}
    return {
        **environment,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1",
    }


class RenderSandbox:
    """The parent's side: start the helper, call it with a deadline, replace it when it fails."""

    def __init__(self, memory_mb: int, backend: str = "pymupdf", isolation: str = "strict") -> None:
        self.memory_bytes = memory_mb * 1024 * 1024
        self.exec_allowed = backend in EXEC_BACKENDS
        self.isolation_setting = isolation
        self._start()

    def _start(self) -> None:
        """A fresh interpreter (never a fork of a multi-threaded Ray worker, nor a re-import of its main
        module) under bubblewrap, in its own session; waits for its isolation report. Under
        ``render.isolation: strict`` a helper that could not load its seccomp filter is killed and refused
        (IsolationUnavailable, a ``render_error``); under ``best_effort`` what is missing is logged once."""
        confined = confinement(self.isolation_setting, helper_environment())
        child_reads, parent_writes = os.pipe()
        parent_reads, child_writes = os.pipe()
        pixels_fd = os.memfd_create("docqa-render-pixels")
        os.ftruncate(pixels_fd, PIXEL_BUFFER_BYTES)
        self.pixels = np.frombuffer(mmap.mmap(pixels_fd, PIXEL_BUFFER_BYTES), dtype=np.uint8)
        code = self.helper_code(child_reads, child_writes, pixels_fd)
        if confined.prefix:  # bubblewrap sets the helper's environment, and its /tmp is its own
            environment, directory = {"PATH": os.environ.get("PATH", "/usr/bin")}, "/"
        else:  # unconfined: a private directory of the host's as its home and temporary directory
            directory = tempfile.mkdtemp(prefix="docqa-render-")
            self._remove_private_dir = weakref.finalize(self, shutil.rmtree, directory, True)
            environment = {**helper_environment(), "HOME": directory, "TMPDIR": directory}
        self._process = subprocess.Popen(
            [*confined.prefix, sys.executable, "-c", code],
            pass_fds=(child_reads, child_writes, pixels_fd),
            stdin=subprocess.DEVNULL,
            env=environment,
            cwd=directory,
            start_new_session=True,
        )
        for fd in (child_reads, child_writes, pixels_fd):
            os.close(fd)
        os.set_blocking(parent_reads, False)
        self._requests, self._answers = parent_writes, parent_reads
        report = self._receive("start", time.monotonic() + START_TIMEOUT_S)  # sent before any hostile byte
        self.started_at = time.monotonic()
        self.isolation = {**report, "namespaces": confined.namespaces}
        seccomp = str(report.get("seccomp", "none: not reported"))
        if seccomp.startswith("none") and self.isolation_setting == "strict":
            self._kill()
            raise IsolationUnavailable(f"the helper's seccomp filter: {seccomp}", SECCOMP_HINT)
        if seccomp.startswith("none") or not confined.prefix:  # best_effort: logged once, recorded in the run
            _log_reduced_isolation(self.summary)

    def helper_code(self, read_fd: int, write_fd: int, pixels_fd: int) -> str:
        """What the helper's interpreter runs: the serve loop on these descriptors."""
        arguments = f"{read_fd}, {write_fd}, {self.memory_bytes}, {pixels_fd}, {self.exec_allowed}"
        return f"from pipeline.render_helper import serve; serve({arguments})"

    @property
    def process_id(self) -> int:
        """The process this sandbox started (bubblewrap, or the helper itself when unconfined)."""
        return self._process.pid

    @property
    def helper_pid(self) -> int:
        """The helper's own process id as this machine sees it (inside bubblewrap it is a descendant of
        ``process_id``): the one whose ``/proc`` entries show its environment, limits and filter."""
        pending = [self._process.pid]
        while pending:
            pid = pending.pop()
            try:
                arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if arguments[0] == sys.executable.encode() and b"pipeline.render_helper" in arguments[-2]:
                    return pid
                for task in Path(f"/proc/{pid}/task").iterdir():
                    pending += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
        raise ProcessLookupError(f"no render helper below process {self._process.pid}")

    @property
    def summary(self) -> str:
        """How the helper is confined, in one line: the run record lists the summaries of its helpers."""
        return " | ".join(str(self.isolation.get(key)) for key in ("namespaces", "network", "seccomp"))

    def _kill(self) -> None:
        """End the helper (and any poppler process it started) and its pipes."""
        try:
            os.killpg(self._process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._process.wait(timeout=30)
        for fd in (self._requests, self._answers):
            try:
                os.close(fd)
            except OSError:
                pass

    def _replace(self) -> None:
        self._kill()
        self._start()

    def _receive(self, operation: str, deadline: float) -> Any:
        """The helper's answer by the deadline, every field checked; a helper that misses it, dies or sends
        what the protocol does not allow is replaced."""
        try:
            message = read_frame(self._answers, deadline, MAX_ANSWER_BYTES)
            return checked_answer(operation, message, PIXEL_BUFFER_BYTES)
        except DocumentError as error:
            if error.status == Status.MEMORY_LIMIT:
                self._replace()  # its heap may be fragmented or half-initialised: start clean
                reason = f"{operation} needed more than the memory limit: {error}"
                raise DocumentError(Status.MEMORY_LIMIT, reason) from None
            raise
        except HelperException:
            raise
        except TimeoutError:
            if operation == "start":  # no new helper in turn: the next document tries again
                self._kill()
                raise DocumentError(
                    Status.RENDER_ERROR, f"the renderer did not start within {START_TIMEOUT_S:.0f} s"
                ) from None
            self._replace()
            raise DocumentError(
                Status.TIMEOUT, f"{operation} did not finish within the document's time limit"
            ) from None
        except (EOFError, OSError):
            code = self._process.poll()
            if operation == "start":
                self._kill()
                raise DocumentError(Status.RENDER_ERROR, f"the renderer did not start (exit code {code})") from None
            self._replace()
            raise DocumentError(
                Status.RENDER_ERROR, f"the renderer died during {operation} (exit code {code})"
            ) from None
        except ProtocolError as error:
            if operation == "start":
                self._kill()
            else:
                self._replace()
            raise DocumentError(
                Status.RENDER_ERROR, f"the renderer's answer to {operation} broke the protocol: {error}"
            ) from None

    def ensure_running(self) -> None:
        """Start the helper again if it died between calls (killed from outside, or its replacement never
        started): not the next call's fault, so a fresh helper takes it."""
        if self._process.poll() is not None:
            self._replace()

    def send(self, operation: str, arguments: tuple[Any, ...]) -> None:
        """Ask the helper for one operation without waiting for its answer (``receive`` reads it)."""
        self.ensure_running()
        try:
            write_frame(self._requests, {"op": operation, "args": list(arguments)})
        except (BrokenPipeError, OSError):
            pass  # the helper is gone; _receive reports it

    def receive(self, operation: str, deadline: float) -> Any:
        """The answer to the operation sent last (see ``call``)."""
        return self._receive(operation, deadline)

    def call(self, operation: str, arguments: tuple[Any, ...], deadline: float) -> Any:
        """Run one operation in the helper; raises DocumentError as the helper reported it, or with the
        status of a helper that missed the deadline (timeout), ran out of memory, died or broke the protocol;
        HelperException for the parser's own exception."""
        self.send(operation, arguments)
        return self._receive(operation, deadline)


@functools.cache
def _log_reduced_isolation(summary: str) -> None:
    """Once per process and confinement (``render.isolation: best_effort`` where something is missing)."""
    log.warning("render isolation reduced (render.isolation=best_effort): %s", summary)


def check_helper(render: RenderConfig, limits: LimitsConfig) -> str:
    """Start one helper exactly as a run would (its bubblewrap, its seccomp filter, its limits) and stop it;
    returns how it was confined. Raises IsolationUnavailable where ``render.isolation: strict`` cannot be
    met, DocumentError where no helper starts at all."""
    helper = RenderSandbox(limits.render_memory_mb, render.backend, render.isolation)
    helper._kill()
    return helper.summary


_SANDBOXES = threading.local()  # each thread its own helpers: two threads never share one's pipes


def sandbox(memory_mb: int, backend: str = "pymupdf", isolation: str = "strict", role: str = "render") -> RenderSandbox:
    """This thread's sandbox for a memory limit, backend, isolation and role (``render``, or ``ocr``: the
    second helper, that reads a page's words while the first renders), started on first use and reused
    afterwards; its helper running when it is returned."""
    sandboxes = _SANDBOXES.__dict__.setdefault("by_key", {})
    key = (memory_mb, backend if backend in EXEC_BACKENDS else "pymupdf", isolation, role)
    if key not in sandboxes:
        sandboxes[key] = RenderSandbox(memory_mb, backend, isolation)
    sandboxes[key].ensure_running()
    return sandboxes[key]


class SandboxedDocument:
    """A document opened in the sandbox: every call runs there under one deadline for the whole document.

    OCR runs in a second helper of this thread (same confinement and limits; the document opened there when
    a page first needs it): ``start_ocr`` hands it a page and returns at once, so that the first helper can
    render meanwhile, and ``finish_ocr`` collects the words."""

    def __init__(self, data: bytes, render: RenderConfig, limits: LimitsConfig):
        self.sandbox = sandbox(limits.render_memory_mb, render.backend, render.isolation)  # started: its start-up
        self.deadline = time.monotonic() + limits.document_timeout_s  # is not the document's time
        self.opening = (data, render.backend, list(render.password_values()))
        self.memory_mb, self.render_config = limits.render_memory_mb, render
        self.num_pages, self.repaired, self.source_format = self.sandbox.call("open", self.opening, self.deadline)
        self.ocr_sandbox: RenderSandbox | None = None
        self.ocr_pending = False

    def page_info(self, page_number: int) -> dict[str, Any]:
        return self.sandbox.call("page_info", (page_number,), self.deadline)

    def page_size(self, page_number: int) -> tuple[float, float]:
        info = self.page_info(page_number)
        return info["width"], info["height"]

    def text_layer(self, page_number: int) -> TextLayer:
        text, words, boxes = self.sandbox.call("text_layer", (page_number,), self.deadline)
        return TextLayer(text, words, boxes)

    def start_ocr(self, page_number: int, language: str, dpi: int, tessdata: str) -> None:
        """Hand the page to the OCR helper; ``finish_ocr`` must follow."""
        if self.ocr_sandbox is None:
            render = self.render_config
            ocr_sandbox = sandbox(self.memory_mb, render.backend, render.isolation, role="ocr")
            ocr_sandbox.call("open", self.opening, self.deadline)
            self.ocr_sandbox = ocr_sandbox
        self.ocr_sandbox.send("ocr", (page_number, language, dpi, tessdata))
        self.ocr_pending = True

    def finish_ocr(self) -> TextLayer:
        """The words of the page handed over by ``start_ocr``."""
        assert self.ocr_sandbox is not None and self.ocr_pending
        self.ocr_pending = False
        text, words, boxes = self.ocr_sandbox.receive("ocr", self.deadline)
        return TextLayer(text, words, boxes)

    def drop_ocr(self) -> None:
        """Read and drop an OCR answer never collected (the page failed meanwhile), so that the OCR helper's
        next answer is the next page's."""
        if self.ocr_pending:
            try:
                self.finish_ocr()
            except (DocumentError, HelperException):
                pass

    def render(self, page_number: int, longest_edge: int) -> np.ndarray:
        shape = self.sandbox.call("render", (page_number, longest_edge), self.deadline)
        return self.sandbox.pixels[: int(np.prod(shape))].reshape(shape).copy()  # the next render reuses the buffer

    def close(self) -> None:
        """Close the document in its helpers (an OCR answer never collected is read and dropped first, so the
        helper's next answer is the next call's)."""
        self.drop_ocr()
        for helper in (self.sandbox, self.ocr_sandbox):
            if helper is None:
                continue
            try:
                helper.call("close", (), time.monotonic() + CLOSE_TIMEOUT_S)
            except (DocumentError, HelperException):
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
        opened = SandboxedDocument(data, render, limits)
    except DocumentError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever a hostile file makes the parser raise
        raise DocumentError(Status.CORRUPT, f"cannot open it: {type(error).__name__}: {error}") from None
    on_helper(opened.sandbox)
    return opened
