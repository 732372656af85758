"""Benchmarks: each measures docqa against a baseline in the same run and prints the ratio."""

from __future__ import annotations

import socket
from pathlib import Path

TINY_MODEL = Path(".cache/tiny-idefics2")


def tiny_model() -> Path:
    """The tiny offline Idefics2, built under .cache/ on first use."""
    from jobs.devtools.tiny_models import build_tiny_idefics2

    if not (TINY_MODEL / "config.json").exists():
        build_tiny_idefics2(TINY_MODEL)
    return TINY_MODEL


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
