"""Stages 1-2: list the input documents, then read each one's bytes (inside the pipeline, not on the driver)."""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pyarrow import fs as pafs

from pipeline.config import LimitsConfig
from pipeline.rows import Status


class InputError(ValueError):
    """The input location does not exist or holds no files."""


@dataclass(frozen=True)
class DocumentRef:
    """A document found by listing: where it is and how big it is."""

    uri: str
    size: int

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


def list_documents(input_uri: str) -> list[DocumentRef]:
    """Every file under a folder (recursively), matching a glob, or the one file named; sorted by URI."""
    if any(char in input_uri for char in "*?["):
        paths = [Path(p) for p in glob.glob(os.path.expanduser(input_uri), recursive=True)]
    else:
        root = Path(input_uri).expanduser()
        if root.is_dir():
            paths = [p for p in root.rglob("*")]
        elif root.is_file():
            paths = [root]
        else:
            raise InputError(f"input {input_uri} does not exist")
    files = sorted(p.resolve() for p in paths if p.is_file())
    if not files:
        raise InputError(f"no files found at input {input_uri}")
    return [DocumentRef(uri=str(p), size=p.stat().st_size) for p in files]


def _filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(uri)


def file_name_of(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


class ReadDocument:
    """Reads a listed document's bytes and hashes them; refuses files over the size limit without reading them."""

    def __init__(self, limits: LimitsConfig) -> None:
        self.limits = limits

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        uri, size = row["uri"], int(row["size"])
        out = {"uri": uri, "file_size": size, "sha256": "", "data": b"", "status": Status.OK.value, "error": ""}
        if size > self.limits.max_file_bytes:
            out.update(
                status=Status.FILE_TOO_LARGE.value,
                error=f"file is {size} bytes, over limits.max_file_bytes={self.limits.max_file_bytes}",
            )
            return out
        try:
            filesystem, path = _filesystem_for(uri)
            with filesystem.open_input_stream(path) as stream:
                data = stream.read()
        except OSError as error:
            out.update(status=Status.READ_ERROR.value, error=f"cannot read {uri}: {error}")
            return out
        out.update(data=data, file_size=len(data), sha256=hashlib.sha256(data).hexdigest())
        return out
