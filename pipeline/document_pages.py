"""The CPU stages as Ray runs them: ``DocumentUnits`` (one task per listing block) reads each document and
plans its work units; ``UnitPages`` (one task per unit) renders and splits a unit's pages and hands them on
one at a time, so that Ray closes a block at the run's byte budget (``render.block_mb``) and a task's
memory does not grow with the document.

A document of one unit travels with its bytes; the units of a longer document carry none and each reads
the document again (the read stage's limits, the same version: a changed file fails the document with
``read_error``), so that a 2,000-page document is not copied once per range through the object store.

Building the page table ourselves (not returning rows from ``map``) lets Arrow wrap each page's sub-image
buffer (megabytes of raw pixels) rather than copy it, and keeps Ray from serializing such rows to
estimate their size. Each stage stays a plain callable with its own tests; this only chains them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import JobConfig
from pipeline.documents import ReadDocument
from pipeline.images import ImageGeometry, SplitPage
from pipeline.rasterize import RasterizeDocument
from pipeline.rows import DOCUMENT_FIELDS, PAGE_SCHEMA, Status
from pipeline.storage import DocumentRef

# What travels from the planning stage to the rendering stage: one row per work unit.
UNIT_SCHEMA = pa.schema(
    [
        *(PAGE_SCHEMA.field(name) for name in (*DOCUMENT_FIELDS, "status", "error", "num_pages", "repaired")),
        ("data", pa.binary()),  # null: the unit reads the document again
        ("first_page", pa.int64()),
        ("last_page", pa.int64()),
        ("ranges", pa.int64()),  # the document's number of units
        PAGE_SCHEMA.field("document_rows"),
    ]
)


# Beside its sub-images, a page row's other columns (identity, question ids, shapes, its text layer's text,
# words and boxes) take at most this for any ordinary page (a dense page of 10,000 words takes ~300 KiB).
PAGE_ROW_ALLOWANCE = 1024 * 1024


def block_threshold(config: JobConfig, geometry: ImageGeometry) -> int:
    """The size past which Ray closes a block (``DataContext.target_max_block_size``): the budget less the
    largest page, since a block is closed only once a page takes it past the threshold."""
    largest_page = geometry.max_split_page_bytes + PAGE_ROW_ALLOWANCE
    return max(1, config.render.block_mb * 1024 * 1024 - largest_page)


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


class DocumentUnits:
    """Listed documents → their work units (``RasterizeDocument.plan``)."""

    def __init__(self, config: JobConfig, geometry: ImageGeometry, ledger=None) -> None:
        self.read = ReadDocument(config.limits, config.storage)
        self.rasterize = RasterizeDocument(config, geometry, ledger)

    def __call__(self, listed: pa.Table) -> pa.Table:
        units = []
        for ref in listed.to_pylist():
            planned = self.rasterize.plan(self.read(ref))
            shared = len(planned) == 1 and planned[0]["status"] == Status.OK
            units += [{**unit, "data": unit["data"] if shared else None} for unit in planned]
        return pa.Table.from_pylist(units, schema=UNIT_SCHEMA)


class UnitPages:
    """Work units → their split pages, one page per batch handed on."""

    def __init__(self, config: JobConfig, geometry: ImageGeometry, ledger=None) -> None:
        read = ReadDocument(config.limits, config.storage)
        self.rasterize = RasterizeDocument(config, geometry, ledger, reread=lambda unit: read(_ref_of(unit)))
        self.split = SplitPage(geometry)
        self.ledger = ledger
        self.start_reported = False

    def __call__(self, units: pa.Table) -> Iterator[pa.Table]:
        if self.ledger is not None and not self.start_reported:  # the run's "time to start rendering"
            self.ledger.record_render_start.remote(time.time())
            self.start_reported = True
        for unit in units.to_pylist():
            for page in self.rasterize.render(unit):
                yield page_table([self.split(page)])


def _ref_of(unit: dict[str, Any]) -> dict[str, Any]:
    """The listing's reference to a unit's document, to read it again."""
    return DocumentRef(unit["uri"], unit["file_size"], unit["etag"], unit["source_version"]).as_row()


def split_pages(config: JobConfig, geometry: ImageGeometry, document: dict[str, Any]) -> list[dict[str, Any]]:
    """A read document's split page rows (or the one row saying why it has none), all in this process: the
    online endpoint runs this on uploads."""
    split = SplitPage(geometry)
    return [split(page) for page in RasterizeDocument(config, geometry)(document)]
