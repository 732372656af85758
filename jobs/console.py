"""What a docqa command prints, and what it keeps quiet.

- Logging: one format on stderr; a library logger with a handler of its own (huggingface_hub) stops
  propagating to the root logger, which printed each of its lines twice.
- Ray's messages that a user cannot act on are dropped: the token-authentication notice (docqa keeps token
  authentication on by design), Ray Data's "Progress bars disabled" (docqa draws its own progress) and its
  INFO lines on every run (its log folder, its operator plan, "execution finished"), and the
  core worker's "constructor arguments in the object store" error that every Ray Data actor pool triggers
  (ray-project/ray#57733). The last one is written by Ray's C++ logger straight to file descriptor 2, so
  that descriptor goes through a pipe whose pump thread forwards everything else as it comes.
- SIGTERM is handled as Ctrl-C (the run is marked failed, `docqa serve` shuts down), instead of Ray's
  native handler printing stack frames.
- Ray is shut down inside the command (``shutdown_ray``), where a Ctrl-C is caught, not by Ray's atexit
  handler, where it printed a traceback.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading

RAY_NOISE = (
    "Token authentication is enabled for this Ray cluster",
    "Progress bars disabled",
    "has constructor arguments in the object store and max_restarts > 0",
    "Task ServeController.graceful_shutdown failed",  # Serve stopping itself: retried, and harmless
)
# Ray Data's INFO lines on every run: where its own logs are, its operator plan, its finish. Dropped from the
# console only (the session's ray-data.log keeps them); its warnings and errors are printed.
RAY_DATA_INFO = ("Full logs are in", "Execution plan of Dataset", "execution finished in")
OWN_HANDLER_LOGGERS = ("huggingface_hub",)  # libraries whose loggers print themselves and also propagate
_installed: set[str] = set()


class CurrentStderr(logging.StreamHandler):
    """A handler that writes to ``sys.stderr`` as it is when a record is emitted, not as it was when the
    handler was made: a command run again in one process (tests, notebooks) never logs into a stream that a
    previous caller swapped in and closed."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s docqa %(message)s",
        datefmt="%H:%M:%S",
        handlers=[CurrentStderr()],
        force=True,
    )
    for name in OWN_HANDLER_LOGGERS:
        logging.getLogger(name).propagate = False


class DropRayNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in RAY_NOISE)


class DropRayDataInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        message = record.getMessage()
        return not any(line in message for line in RAY_DATA_INFO)


def before_ray_init() -> None:
    """Filters on Ray's own log handlers (they do not propagate to the root logger)."""
    if "logging" in _installed:
        return
    import ray
    import ray.data  # noqa: F401

    for name in ("ray", "ray.data", "ray.serve"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(DropRayNoise())
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.addFilter(DropRayDataInfo())  # the console's, not the session's log files
    _installed.add("logging")


def after_ray_init() -> None:
    """Drop the native noise lines on stderr, and handle SIGTERM as Ctrl-C (main thread only). Processes
    that Ray started before this (a local instance's raylet and GCS) keep the real stderr. Marks Ray as
    this command's to shut down (``shutdown_ray``)."""
    _installed.add("ray")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    if "stderr" not in _installed:
        _filter_native_stderr()
        _installed.add("stderr")


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt("SIGTERM")


def _filter_native_stderr() -> None:
    """Route file descriptor 2 through a pipe: whole lines that hold a RAY_NOISE text are dropped, all else
    is forwarded at once (a partial line too, unless it may be the start of a native log line, "[2026-...",
    which is written whole). At exit the pipe is drained and the real stderr put back."""
    noise = tuple(text.encode() for text in RAY_NOISE)
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        pending = b""
        while chunk := os.read(read_end, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            kept = [line + b"\n" for line in lines if not any(text in line for text in noise)]
            if pending and not pending.startswith(b"["):
                kept.append(pending)
                pending = b""
            if kept:
                os.write(real, b"".join(kept))
        if pending:
            os.write(real, pending)

    thread = threading.Thread(target=pump, name="docqa-stderr", daemon=True)
    thread.start()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(real, 2)  # closes the pipe's last write end: the pump reads what is left, then ends
        thread.join(timeout=5)

    atexit.register(restore)


def shutdown_ray() -> None:
    """Shut Ray down now, inside the command, if the command started or joined it: a Ctrl-C meanwhile ends
    it quietly (what the command did is done; Ray's own atexit handler then has nothing left to do)."""
    if "ray" not in _installed:
        return  # Ray was started by the caller (a test, a notebook), not by this command: it stays
    try:
        import ray

        ray.shutdown()
        _installed.discard("ray")
    except KeyboardInterrupt:
        print("docqa: interrupted while Ray shut down; what the command did is done", file=sys.stderr)
