"""Stage 3: open each PDF and render the pages some question applies to, at the resolution the model keeps.

Two backends with one contract (``open_pdf`` → ``PdfDocument``): PyMuPDF (default) and pdf2image/poppler.
A document that cannot be processed becomes one row with its status and reason; a page that cannot be
rendered becomes one row for that page. Nothing raises out of this stage.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any, Protocol

import numpy as np

from pipeline.config import JobConfig
from pipeline.images import ImageGeometry
from pipeline.rows import Status

PDF_MAGIC = b"%PDF-"
# Carried from the read stage to every row of the document.
DOCUMENT_FIELDS = ("uri", "file_size", "source_version", "etag", "version_id", "sha256")
PDF_HEADER_WINDOW = 1024  # readers accept the header anywhere in the first 1024 bytes


class DocumentError(Exception):
    """A document-level failure with its status."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class PdfDocument(Protocol):
    num_pages: int

    def page_size(self, page_number: int) -> tuple[float, float]:
        """(width, height) in points, rotation applied."""

    def render(self, page_number: int, longest_edge: int) -> np.ndarray:
        """The page as (H, W, 3) uint8 RGB with its longest edge ``longest_edge`` pixels."""

    def close(self) -> None: ...


class PyMuPdfDocument:
    def __init__(self, data: bytes) -> None:
        import pymupdf

        try:
            self.document = pymupdf.open(stream=data, filetype="pdf")
        except Exception as error:  # noqa: BLE001 - MuPDF raises several types for broken files
            raise DocumentError(Status.CORRUPT, f"MuPDF cannot open it: {error}") from None
        if self.document.needs_pass:
            raise DocumentError(Status.ENCRYPTED, "the PDF is encrypted and needs a password")
        self.num_pages = self.document.page_count

    def page_size(self, page_number: int) -> tuple[float, float]:
        rect = self.document[page_number - 1].rect
        return rect.width, rect.height

    def render(self, page_number: int, longest_edge: int) -> np.ndarray:
        import pymupdf

        page = self.document[page_number - 1]
        zoom = longest_edge / max(page.rect.width, page.rect.height)
        pixmap = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), colorspace=pymupdf.csRGB, alpha=False)
        rows = np.frombuffer(pixmap.samples, dtype=np.uint8).reshape(pixmap.height, pixmap.stride)
        return rows[:, : pixmap.width * 3].reshape(pixmap.height, pixmap.width, 3)

    def close(self) -> None:
        self.document.close()


class PopplerDocument:
    """pdf2image over poppler's pdfinfo/pdftoppm: the second backend, same contract."""

    _PAGE_SIZE = re.compile(r"^Page\s+(\d+)\s+size$")
    _PAGE_ROT = re.compile(r"^Page\s+(\d+)\s+rot$")

    def __init__(self, data: bytes) -> None:
        from pdf2image import pdfinfo_from_bytes
        from pdf2image.exceptions import PDFInfoNotInstalledError, PDFPageCountError, PDFSyntaxError

        self.data = data
        try:
            info = pdfinfo_from_bytes(data)
        except PDFInfoNotInstalledError:
            raise
        except (PDFPageCountError, PDFSyntaxError, ValueError) as error:
            message = str(error).strip()
            if "Incorrect password" in message or "encrypted" in message.lower():
                raise DocumentError(Status.ENCRYPTED, "the PDF is encrypted and needs a password") from None
            raise DocumentError(Status.CORRUPT, f"poppler cannot open it: {message[:500]}") from None
        self.num_pages = int(info.get("Pages", 0))
        self.sizes: dict[int, tuple[float, float]] = {}
        if self.num_pages:
            detail = pdfinfo_from_bytes(data, first_page=1, last_page=self.num_pages)
            rotations = {int(m.group(1)): int(float(v)) for k, v in detail.items() if (m := self._PAGE_ROT.match(k))}
            for key, value in detail.items():
                if match := self._PAGE_SIZE.match(key):
                    page = int(match.group(1))
                    width, height = (float(part) for part in value.split()[0:3:2])
                    self.sizes[page] = (height, width) if rotations.get(page, 0) % 180 else (width, height)

    def page_size(self, page_number: int) -> tuple[float, float]:
        return self.sizes[page_number]

    def render(self, page_number: int, longest_edge: int) -> np.ndarray:
        from pdf2image import convert_from_bytes

        [image] = convert_from_bytes(
            self.data, size=longest_edge, first_page=page_number, last_page=page_number, fmt="ppm"
        )
        return np.asarray(image.convert("RGB"))

    def close(self) -> None:
        self.data = b""


def open_pdf(data: bytes, backend: str) -> PdfDocument:
    """Open a PDF by content (never by name) with the configured backend; raises DocumentError."""
    if not data:
        raise DocumentError(Status.EMPTY, "the file is empty (0 bytes)")
    if PDF_MAGIC not in data[:PDF_HEADER_WINDOW]:
        raise DocumentError(Status.NOT_PDF, f"no {PDF_MAGIC.decode()} header in the first {PDF_HEADER_WINDOW} bytes")
    document: PdfDocument = PyMuPdfDocument(data) if backend == "pymupdf" else PopplerDocument(data)
    if document.num_pages == 0:
        document.close()
        raise DocumentError(Status.EMPTY, "the PDF has no pages")
    return document


def rendered_size(page_size: tuple[float, float], longest_edge: int) -> tuple[int, int]:
    """(height, width) in pixels of a page rendered with its longest edge at ``longest_edge``."""
    width, height = page_size
    zoom = longest_edge / max(width, height)
    return max(1, math.ceil(height * zoom)), max(1, math.ceil(width * zoom))


class RasterizeDocument:
    """Ray Data stage (flat_map): a read document → one row per rendered page, or one row saying why not."""

    def __init__(self, config: JobConfig, geometry: ImageGeometry, ledger=None) -> None:
        self.config = config
        self.geometry = geometry
        self.ledger = ledger  # the run's page budget, when it has one

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        base = {
            **{field: row[field] for field in DOCUMENT_FIELDS},
            "num_pages": 0,
            "page_number": 0,
            "document_rows": 1,
            "status": row["status"],
            "error": row["error"],
            "render_ms": 0.0,
            "image": b"",
            "height": 0,
            "width": 0,
        }
        if row["status"] != Status.OK:
            return [base]
        try:
            document = open_pdf(row["data"], self.config.render.backend)
        except DocumentError as error:
            return [{**base, "status": error.status.value, "error": error.reason}]
        try:
            return self._render_pages(document, base)
        finally:
            document.close()

    def _render_pages(self, document: PdfDocument, base: dict[str, Any]) -> list[dict[str, Any]]:
        num_pages = document.num_pages
        base = {**base, "num_pages": num_pages}
        limits = self.config.limits
        if num_pages > limits.max_pages_per_document:
            reason = f"{num_pages} pages, over limits.max_pages_per_document={limits.max_pages_per_document}"
            return [{**base, "status": Status.TOO_MANY_PAGES.value, "error": reason}]
        pages = self.config.selected_pages(num_pages)
        if not pages:
            reason = f"no question applies to any of its {num_pages} page(s)"
            return [{**base, "status": Status.NO_APPLICABLE_PAGES.value, "error": reason}]
        if self.ledger is not None:
            import ray

            if not ray.get(self.ledger.take_pages.remote(len(pages))):
                reason = f"{len(pages)} pages would exceed budget.max_pages; left for the next run"
                return [{**base, "status": Status.DEFERRED.value, "error": reason}]
        # Every (page, question) gets exactly one row, answered or not: the writer uses this to know a
        # document is complete.
        base["document_rows"] = sum(len(self.config.questions_for_page(page, num_pages)) for page in pages)
        longest_edge = self.geometry.render_longest_edge
        rows = []
        for page_number in pages:
            page_row = {**base, "page_number": page_number}
            started = time.perf_counter()
            try:
                height, width = rendered_size(document.page_size(page_number), longest_edge)
                if height * width > limits.max_pixels_per_page:
                    reason = (
                        f"page renders to {width}x{height} px, over limits.max_pixels_per_page="
                        f"{limits.max_pixels_per_page}"
                    )
                    rows.append({**page_row, "status": Status.PAGE_TOO_LARGE.value, "error": reason})
                    continue
                image = document.render(page_number, longest_edge)
            except Exception as error:  # noqa: BLE001 - one bad page must not fail its document
                reason = f"cannot render page {page_number}: {type(error).__name__}: {error}"
                rows.append({**page_row, "status": Status.RENDER_ERROR.value, "error": reason})
                continue
            rows.append(
                {
                    **page_row,
                    "render_ms": (time.perf_counter() - started) * 1000,
                    "image": image.tobytes(),
                    "height": image.shape[0],
                    "width": image.shape[1],
                }
            )
        return rows
