"""``DocumentPages``, the ``map_batches`` operator (pyarrow batches, one task per listed document) that
reads, rasterizes and splits each document and hands the actor pool one Arrow table of split pages.

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
from pipeline.rows import PAGE_SCHEMA


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
    """Listed documents → their split pages, or the rows saying why not."""

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
