"""Stages 2-4 as one Ray Data task per listed document: read → rasterize → split, then one Arrow table.

Ray would fuse the three stages into one task anyway. Running them as one ``map_batches`` lets us build
the output table ourselves: each page's sub-image buffer (megabytes of raw pixels) is wrapped by Arrow
rather than copied, and Ray never serializes such rows to estimate their size, as it does for every row a
``map`` returns. Each stage stays a plain callable with its own tests; this only chains them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import JobConfig
from pipeline.documents import ReadDocument
from pipeline.images import ImageGeometry, SplitPage
from pipeline.rasterize import RasterizeDocument

# The split stage's rows, as the actor receives them.
PAGE_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("file_size", pa.int64()),
        ("source_version", pa.string()),
        ("etag", pa.string()),
        ("version_id", pa.string()),
        ("sha256", pa.string()),
        ("num_pages", pa.int64()),
        ("page_number", pa.int64()),
        ("document_rows", pa.int64()),
        ("repaired", pa.bool_()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("render_ms", pa.float64()),
        ("sub_images", pa.binary()),
        ("sub_image_shapes", pa.list_(pa.int64())),
    ]
)


def _wrapped(buffer: np.ndarray) -> pa.Array:
    """A one-element binary array over ``buffer``'s memory (no copy)."""
    offsets = pa.py_buffer(np.array([0, buffer.nbytes], dtype=np.int32))
    return pa.Array.from_buffers(pa.binary(), 1, [None, offsets, pa.py_buffer(buffer)])


def page_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Split-page rows as a PAGE_SCHEMA table; the sub-image column is one chunk per row, wrapping its buffer."""
    columns = [
        pa.chunked_array([_wrapped(row["sub_images"]) for row in rows], type=pa.binary())
        if field.name == "sub_images"
        else pa.array([row[field.name] for row in rows], type=field.type)
        for field in PAGE_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=PAGE_SCHEMA)


class DocumentPages:
    """Ray Data stage (map_batches, pyarrow): listed documents → their split pages, or the rows saying why not."""

    def __init__(self, config: JobConfig, geometry: ImageGeometry, ledger=None) -> None:
        self.read = ReadDocument(config.limits, config.storage)
        self.rasterize = RasterizeDocument(config, geometry, ledger)
        self.split = SplitPage(geometry)

    def __call__(self, listed: pa.Table) -> pa.Table:
        return page_table([page for ref in listed.to_pylist() for page in self.split_pages(self.read(ref))])

    def split_pages(self, document: dict[str, Any]) -> list[dict[str, Any]]:
        """A read document's split page rows (or the one row saying why it has none); the online endpoint
        runs this on uploads."""
        return [self.split(page) for page in self.rasterize(document)]
