"""The render helper's side (pipeline/sandbox.py starts it): the one process that parses hostile bytes.

Before it reads a byte it confines itself (``confine``: no new privileges, a seccomp filter that refuses
every socket but a Unix one), caps its address space, and reports what is in force; then it serves one open
document at a time over two pipes: open, page size, text layer, render (pixels through the shared buffer
when they fit), close. It runs pipeline/pdf.py and nothing of Ray or of the worker."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource
import socket
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.records import DocumentError, Status

# Shared between the parent and its helper: holds a rendered page up to about 22 megapixels (RGB).
PIXEL_BUFFER_BYTES = 64 * 1024 * 1024
SHARED = "shared"
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_CLOSED = "closed: seccomp refuses every socket but AF_UNIX"


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or "malloc" in str(error).lower() or "out of memory" in str(error).lower()


def confine() -> str:
    """In the helper, before it reads a document: no new privileges, then the network filter. Returns how
    the network is closed, or why it is not."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    try:
        import pyseccomp as seccomp

        syscall_filter = seccomp.SyscallFilter(seccomp.ALLOW)
        refuse = seccomp.ERRNO(errno.EACCES)
        syscall_filter.add_rule(refuse, "socket", seccomp.Arg(0, seccomp.NE, socket.AF_UNIX))
        syscall_filter.add_rule(refuse, "io_uring_setup")  # io_uring can open sockets without socket()
        syscall_filter.load()
    except Exception as error:  # noqa: BLE001 - no libseccomp, or a kernel or container that refuses filters
        return f"open: the seccomp filter could not be loaded ({type(error).__name__}: {error})"
    return SECCOMP_CLOSED


def isolation_report(network: str, probe_address: tuple[str, int] | None = None) -> dict[str, Any]:
    """What the helper itself sees: its environment's names, no-new-privileges, its working directory, and
    whether a TCP connection (to ``probe_address`` if given) can be made."""
    try:
        with socket.create_connection(probe_address or ("127.0.0.1", 9), timeout=2):
            connect = "connected"
    except OSError as error:
        connect = f"refused by the sandbox ({error.strerror})" if error.errno == errno.EACCES else "failed"
    status = Path("/proc/self/status").read_text()
    return {
        "network": network,
        "connect": connect,
        "no_new_privileges": "NoNewPrivs:\t1" in status,
        "environment": sorted(os.environ),
        "working_directory": os.getcwd(),
    }


def serve(read_fd: int, write_fd: int, memory_bytes: int, pixels_fd: int) -> None:
    """The helper's loop: one open document at a time; answers ("ok", value) or ("error", kind, ...).
    Rendered pixels go through the shared buffer when they fit (a pipe moves 8 MB pages slowly). The first
    answer, before any request, is the isolation report."""
    network = confine()
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    from pipeline.pdf import open_pdf  # after the cap: the parsers' own memory counts against it

    pixels = np.frombuffer(mmap.mmap(pixels_fd, PIXEL_BUFFER_BYTES), dtype=np.uint8)

    requests, connection = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    try:
        connection.send(("ok", isolation_report(network)))
    except OSError:  # the parent went away before asking anything (its task was cancelled): nobody to tell
        return
    document = None
    while True:
        try:
            operation, arguments = requests.recv()
        except (EOFError, OSError):
            return
        try:
            if operation == "open":
                if document is not None:
                    document.close()
                document = open_pdf(*arguments)
                answer: tuple[Any, ...] = ("ok", (document.num_pages, document.repaired))
            elif operation == "isolation":
                answer = ("ok", isolation_report(network, *arguments))
            elif operation == "page_size":
                answer = ("ok", document.page_size(*arguments))
            elif operation == "text_layer":
                answer = ("ok", document.text_layer(*arguments))
            elif operation == "render":
                image = document.render(*arguments)
                if image.nbytes <= PIXEL_BUFFER_BYTES:
                    pixels[: image.nbytes].reshape(image.shape)[...] = image
                    answer = ("ok", (SHARED, image.shape))
                else:
                    answer = ("ok", (image.tobytes(), image.shape))
            else:  # close
                if document is not None:
                    document.close()
                document = None
                answer = ("ok", None)
        except DocumentError as error:
            answer = ("error", error)
        except BaseException as error:  # noqa: BLE001 - reported to the parent, which decides
            reason = f"{type(error).__name__}: {error}"
            answer = ("error", DocumentError(Status.MEMORY_LIMIT, reason) if _is_out_of_memory(error) else reason)
        try:
            connection.send(answer)
        except MemoryError:
            too_large = DocumentError(Status.MEMORY_LIMIT, "the result does not fit in the memory limit")
            connection.send(("error", too_large))
        except OSError:  # the parent went away (task cancelled, worker stopped): nobody to answer
            return
