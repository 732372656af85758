"""The input side of the plan: ``DocumentListing``, the Ray Data source (``read_datasource``) that lists the
input documents as it goes, and ``ReadDocument``, which reads each one's bytes inside the per-document
``map_batches`` task (pipeline/document_pages.py)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.config import LimitsConfig, StorageConfig
from pipeline.rows import Status, document_row, failed
from pipeline.storage import describe_client_error, iter_documents, read_object

REF_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("etag", pa.string()), ("version", pa.string())])


class KnownVersions:
    """The (URI, version) pairs that need no processing, as a sorted array of 64-bit hashes: 8 bytes a
    document, so a million of them pickle to the listing task in milliseconds (a set of string pairs would
    take ~300 MB). A false match needs a 64-bit collision among them: about 1 in 10^13 for a million."""

    def __init__(self, documents: Sequence[str] = (), versions: Sequence[str] = ()) -> None:
        hashes = np.fromiter(
            (self._hash(uri, version) for uri, version in zip(documents, versions, strict=True)),
            dtype=np.uint64,
            count=len(documents),
        )
        self.hashes = np.unique(hashes)

    @staticmethod
    def _hash(uri: str, version: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"{uri}\0{version}".encode(), digest_size=8).digest(), "little")

    def __len__(self) -> int:
        return len(self.hashes)

    def __contains__(self, pair: tuple[str, str]) -> bool:
        value = np.uint64(self._hash(*pair))
        index = int(np.searchsorted(self.hashes, value))
        return index < len(self.hashes) and self.hashes[index] == value


class DocumentListing(Datasource):
    """The input listing as a Ray Data source: one read task pages through the listing and emits one block
    per document as it goes, so the driver never holds the listing and work starts on the first page.

    Documents whose (URI, version) already has committed results are skipped (``completed``: a committed
    run's; ``resumed``: an earlier attempt of this run's, which count as done by this run); past
    ``max_documents`` the rest are only counted. The counts go to the run's ledger as the listing grows (at
    most once a second) and once more when it is complete: the driver's progress line shows them."""

    def __init__(
        self,
        input_uri: str,
        storage: StorageConfig,
        completed: KnownVersions | None = None,
        max_documents: int | None = None,
        ledger=None,
        resumed: KnownVersions | None = None,
    ) -> None:
        super().__init__()
        self.input_uri = input_uri
        self.storage = storage
        self.completed = completed or KnownVersions()
        self.resumed = resumed or KnownVersions()
        self.max_documents = max_documents
        self.ledger = ledger

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def _blocks(self) -> Iterator[pa.Table]:
        counts = {"taken": 0, "resumed": 0, "unchanged": 0, "left": 0}
        reported = time.monotonic()
        for ref in iter_documents(self.input_uri, self.storage):
            if ref.version is not None and (ref.uri, ref.version) in self.resumed:
                counts["resumed"] += 1
            elif ref.version is not None and (ref.uri, ref.version) in self.completed:
                counts["unchanged"] += 1
            elif self.max_documents is not None and counts["taken"] >= self.max_documents:
                counts["left"] += 1
            else:
                counts["taken"] += 1
                yield pa.Table.from_pylist([ref.as_row()], schema=REF_SCHEMA)
            if self.ledger is not None and time.monotonic() - reported >= 1.0:
                self.ledger.record_listing.remote(counts, complete=False)
                reported = time.monotonic()
        if self.ledger is not None:
            import ray

            ray.get(self.ledger.record_listing.remote(counts, complete=True))

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(self._blocks, metadata, schema=REF_SCHEMA, per_task_row_limit=per_task_row_limit)]


def document_of_bytes(uri: str, data: bytes) -> dict[str, Any]:
    """A document that arrived as bytes (an upload), as the read stage would hand it on: its content hash
    stands for its version."""
    digest = hashlib.sha256(data).hexdigest()
    return document_row(uri, len(data), source_version=digest, sha256=digest, data=data)


def _too_large(row: dict[str, Any], size: int, limit: int) -> dict[str, Any]:
    return failed(row, Status.FILE_TOO_LARGE, f"file is {size} bytes, over limits.max_file_bytes={limit}")


class ReadDocument:
    """Reads a listed document's bytes and hashes them; refuses files over the size limit without reading
    them. The ETag and version id recorded are the ones returned with the bytes that were hashed."""

    def __init__(self, limits: LimitsConfig, storage: StorageConfig) -> None:
        self.limits = limits
        self.storage = storage

    def __call__(self, ref: dict[str, Any]) -> dict[str, Any]:
        uri = ref["uri"]
        out = document_row(uri, int(ref["size"]), source_version=ref["version"] or None, etag=ref["etag"] or None)
        limit = self.limits.max_file_bytes
        if out["file_size"] > limit:
            return _too_large(out, out["file_size"], limit)
        try:
            read = read_object(uri, self.storage, limit)
        except Exception as error:  # noqa: BLE001 - any storage failure becomes this document's row
            return failed(out, Status.READ_ERROR, describe_client_error(error, f"cannot read {uri}"))
        etag = read.etag or out["etag"]
        out.update(
            file_size=read.size,
            etag=etag,
            version_id=read.version_id or None,
            source_version=out["source_version"] or etag,  # a URI from a list file learns its version here
        )
        if read.size > limit:
            return _too_large(out, read.size, limit)
        out.update(data=read.data, sha256=hashlib.sha256(read.data).hexdigest())
        return out
