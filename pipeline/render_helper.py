"""The render helper's side (pipeline/sandbox.py starts it): the one process that parses hostile bytes.

It starts inside bubblewrap's namespaces (pipeline/confinement.py), and before it reads a byte it confines
itself further (``confine``): no new privileges, killed with its parent, resource limits (address space,
processes, file size, CPU time, no core files), and a seccomp filter (pyseccomp over libseccomp) that refuses
every socket but a Unix one, io_uring, ptrace and other processes' memory, mounts, namespaces, BPF, kernel
keys and perf events; with the PyMuPDF backend also every exec, every new process (threads only) and a
signal to any other process (the pdf2image backend runs poppler's programs, so it keeps exec and fork, inside
the same namespaces). Then it serves one open document at a time over two pipes, in the frames of
pipeline/helper_protocol.py: open (pipeline/formats.py: a PDF or an image file), page info, text layer, OCR,
render (pixels into the shared buffer), close. It runs nothing of Ray or of the worker.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource
import signal
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.helper_protocol import (
    MAX_REQUEST_BYTES,
    MAX_TEXT_CHARS,
    MAX_WORD_CHARS,
    MAX_WORDS,
    ProtocolError,
    checked_request,
    read_frame,
    write_frame,
)
from pipeline.records import DocumentError, Status

# Shared between the parent and its helper: holds a rendered page up to about 22 megapixels (RGB).
PIXEL_BUFFER_BYTES = 64 * 1024 * 1024
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_CLOSED = "closed: seccomp refuses every socket but AF_UNIX"
MAX_PROCESSES = 64  # RLIMIT_NPROC (a per-user count: not enforced for a helper whose user is root outside)
MAX_FILE_BYTES = 512 * 1024 * 1024  # RLIMIT_FSIZE: pdf2image spools the document (limits.max_file_bytes) to /tmp
MAX_CPU_SECONDS = 6 * 3600  # RLIMIT_CPU: a helper is reused across documents; its deadline is the parent's
CLONE_THREAD = 0x00010000
# Refused for every helper: what reaches outside its own process (beside sockets and io_uring, below).
REFUSED_ALWAYS = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "bpf",
    "keyctl",
    "add_key",
    "request_key",
    "perf_event_open",
    "open_by_handle_at",
    "kexec_load",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
)
REFUSED_WITHOUT_EXEC = ("execve", "execveat", "fork", "vfork", "clone3")


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or "malloc" in str(error).lower() or "out of memory" in str(error).lower()


def confine(memory_bytes: int, exec_allowed: bool) -> dict[str, str]:
    """In the helper, before it reads a document; returns what is in force (the isolation report's fields)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1 and not Path("/proc/1/comm").read_text().startswith("bwrap"):
        os._exit(0)  # the parent died before the death signal was armed
    limits = {
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_FSIZE: MAX_FILE_BYTES,
        resource.RLIMIT_CPU: MAX_CPU_SECONDS,
        resource.RLIMIT_NPROC: MAX_PROCESSES,
        resource.RLIMIT_AS: memory_bytes,
    }
    for limit, value in limits.items():
        resource.setrlimit(limit, (value, value))
    rlimits = f"address space {memory_bytes >> 20} MiB, {MAX_PROCESSES} processes, files {MAX_FILE_BYTES >> 20} MiB, "
    rlimits += f"CPU {MAX_CPU_SECONDS} s, no core files"
    try:
        import pyseccomp as seccomp

        syscall_filter = seccomp.SyscallFilter(seccomp.ALLOW)
        refuse = seccomp.ERRNO(errno.EACCES)
        syscall_filter.add_rule(refuse, "socket", seccomp.Arg(0, seccomp.NE, socket.AF_UNIX))
        syscall_filter.add_rule(refuse, "io_uring_setup")  # io_uring can open sockets without socket()
        for name in REFUSED_ALWAYS:
            syscall_filter.add_rule(seccomp.ERRNO(errno.EPERM), name)
        if not exec_allowed:
            for name in REFUSED_WITHOUT_EXEC:
                syscall_filter.add_rule(seccomp.ERRNO(errno.ENOSYS if name == "clone3" else errno.EPERM), name)
            # clone for a thread only (CLONE_THREAD set): never a new process
            syscall_filter.add_rule(
                seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_THREAD, 0)
            )
            own = os.getpid()
            for name in ("kill", "tgkill"):
                syscall_filter.add_rule(seccomp.ERRNO(errno.EPERM), name, seccomp.Arg(0, seccomp.NE, own))
            syscall_filter.add_rule(seccomp.ERRNO(errno.EPERM), "tkill")
        syscall_filter.load()
    except Exception as error:  # noqa: BLE001 - no libseccomp, or a kernel or container that refuses filters
        # The worker refuses such a helper under render.isolation: strict (pipeline/sandbox.py).
        return {
            "network": "not filtered: no seccomp filter",
            "seccomp": f"none: the filter could not be loaded ({type(error).__name__}: {error})"[:1000],
            "limits": rlimits,
        }
    refused = "sockets but AF_UNIX, io_uring, ptrace, other processes' memory, mounts, namespaces, bpf, keys"
    refused += "" if exec_allowed else ", exec, new processes, signals to other processes"
    return {"network": SECCOMP_CLOSED, "seccomp": f"refuses {refused}", "limits": rlimits}


def isolation_report(confined: dict[str, str], probe_address: tuple[str, int] | None = None) -> dict[str, Any]:
    """What the helper itself sees: its environment's names, no-new-privileges, its working directory, and
    whether a TCP connection (to ``probe_address`` if given) can be made."""
    try:
        with socket.create_connection(probe_address or ("127.0.0.1", 9), timeout=2):
            connect = "connected"
    except OSError as error:
        connect = f"refused by the sandbox ({error.strerror})" if error.errno == errno.EACCES else "failed"
    status = Path("/proc/self/status").read_text()
    return {
        **confined,
        "connect": connect,
        "no_new_privileges": "NoNewPrivs:\t1" in status,
        "environment": sorted(os.environ),
        "working_directory": os.getcwd(),
    }


def _text_layer(layer) -> dict[str, Any]:
    """A text layer within the protocol's caps (a page past them keeps what fits)."""
    words = [word[:MAX_WORD_CHARS] for word in layer.words[:MAX_WORDS]]
    return {
        "text": layer.text[:MAX_TEXT_CHARS],
        "words": words,
        "boxes": [float(v) for v in layer.boxes[: 4 * len(words)]],
    }


def open_source(data: bytes, backend: str, passwords: tuple[str, ...] = ()):
    """The document in ``data`` opened in this process (the render helper) as a ``SourceDocument``
    (pipeline/pdf.py): PDFs with the configured backend, images with Pillow. Raises DocumentError. The
    parsers are imported here, after ``confine``: their own memory counts against the caps."""
    from pipeline.formats import IMAGE_FORMATS, PDF, detect_format

    detected = detect_format(data)
    if detected == PDF:
        from pipeline.pdf import open_pdf

        return open_pdf(data, backend, passwords)
    from pipeline.image_files import ImageDocument

    return ImageDocument(data, IMAGE_FORMATS[detected])


def serve(read_fd: int, write_fd: int, memory_bytes: int, pixels_fd: int, exec_allowed: bool) -> None:
    """The helper's loop. The first answer, before any request, is the isolation report."""
    confined = confine(memory_bytes, exec_allowed)
    pixels = np.frombuffer(mmap.mmap(pixels_fd, PIXEL_BUFFER_BYTES), dtype=np.uint8)
    try:
        write_frame(write_fd, {"ok": True, "value": isolation_report(confined)})
    except OSError:  # the parent went away before asking anything (its task was cancelled): nobody to tell
        return
    document = None
    while True:
        try:
            operation, arguments = checked_request(read_frame(read_fd, time.monotonic() + 10**9, MAX_REQUEST_BYTES))
        except (EOFError, OSError, ProtocolError):
            return
        try:
            if operation == "open":
                if document is not None:
                    document.close()
                data, backend, passwords = arguments
                document = open_source(bytes(data), str(backend), tuple(str(p) for p in passwords))
                opened = [document.num_pages, bool(document.repaired), document.source_format]
                answer: dict[str, Any] = {"ok": True, "value": opened}
            elif operation == "isolation":
                address = (str(arguments[0][0]), int(arguments[0][1])) if arguments else None
                answer = {"ok": True, "value": isolation_report(confined, address)}
            elif operation == "page_info":
                answer = {"ok": True, "value": document.page_info(int(arguments[0]))}
            elif operation == "text_layer":
                answer = {"ok": True, "value": _text_layer(document.text_layer(int(arguments[0])))}
            elif operation == "ocr":
                page_number, language, dpi, tessdata = arguments
                layer = document.ocr(int(page_number), str(language), int(dpi), str(tessdata))
                answer = {"ok": True, "value": _text_layer(layer)}
            elif operation == "render":
                image = document.render(int(arguments[0]), int(arguments[1]))
                if image.nbytes > PIXEL_BUFFER_BYTES:
                    raise DocumentError(
                        Status.PAGE_TOO_LARGE,
                        f"the page renders to {image.nbytes} bytes, over the "
                        f"renderer's {PIXEL_BUFFER_BYTES}-byte buffer",
                    )
                pixels[: image.nbytes].reshape(image.shape)[...] = image
                answer = {"ok": True, "value": list(image.shape)}
            else:  # close
                if document is not None:
                    document.close()
                document = None
                answer = {"ok": True, "value": None}
        except DocumentError as error:
            answer = {"ok": False, "status": error.status.value, "reason": error.reason[:2000]}
        except BaseException as error:  # noqa: BLE001 - reported to the parent, which decides
            reason = f"{type(error).__name__}: {error}"[:2000]
            if _is_out_of_memory(error):
                answer = {"ok": False, "status": Status.MEMORY_LIMIT.value, "reason": reason}
            else:  # the parser's own exception: the parent decides what it means for the operation
                answer = {"ok": False, "exception": reason}
        try:
            write_frame(write_fd, answer)
        except MemoryError:
            write_frame(
                write_fd,
                {
                    "ok": False,
                    "status": Status.MEMORY_LIMIT.value,
                    "reason": "the answer does not fit in the memory limit",
                },
            )
        except OSError:  # the parent went away (task cancelled, worker stopped): nobody to answer
            return
