"""Stage 3: open each PDF and render the pages some question applies to, at the resolution the model keeps.

Two backends with one contract (``open_pdf`` → ``PdfDocument``): PyMuPDF (default) and pdf2image/poppler.
A document that cannot be processed becomes one row with its status and reason; a page that cannot be
rendered becomes a row for that page (the actor expands it to one per question). Opening and rendering
run in the sandbox (pipeline/sandbox.py). Nothing raises out of this stage.
"""

from __future__ import annotations

import re
import time
from typing import Any, Protocol

import numpy as np

from pipeline.config import JobConfig, LimitsConfig
from pipeline.images import ImageGeometry
from pipeline.rows import DocumentError, Status
from pipeline.sandbox import RenderSandbox, SandboxedDocument, SandboxFailure

PDF_MAGIC = b"%PDF-"
ENCRYPTED_REASON = "the PDF is encrypted and needs a password (none of render.passwords opened it)"
# Carried from the read stage to every row of the document.
DOCUMENT_FIELDS = ("uri", "file_size", "source_version", "etag", "version_id", "sha256")
PDF_HEADER_WINDOW = 1024  # readers accept the header anywhere in the first 1024 bytes


class PdfDocument(Protocol):
    num_pages: int
    repaired: bool  # the parser had to repair the file to open it

    def page_size(self, page_number: int) -> tuple[float, float]:
        """(width, height) in points, rotation applied."""

    def render(self, page_number: int, longest_edge: int) -> np.ndarray:
        """The page as (H, W, 3) uint8 RGB of exactly ``rendered_size(page_size, longest_edge)``."""

    def close(self) -> None: ...


class PyMuPdfDocument:
    def __init__(self, data: bytes, passwords: tuple[str, ...] = ()) -> None:
        import pymupdf

        pymupdf.TOOLS.mupdf_display_errors(False)  # the errors we act on come back as exceptions
        try:
            self.document = pymupdf.open(stream=data, filetype="pdf")
        except Exception as error:  # noqa: BLE001 - MuPDF raises several types for broken files
            raise DocumentError(Status.CORRUPT, f"MuPDF cannot open it: {error}") from None
        if self.document.needs_pass and not any(self.document.authenticate(password) for password in passwords):
            raise DocumentError(Status.ENCRYPTED, ENCRYPTED_REASON)
        self.repaired = bool(self.document.is_repaired)
        try:
            self.num_pages = self.document.page_count
        except Exception as error:  # noqa: BLE001 - e.g. "Invalid number of pages" on a broken page tree
            raise DocumentError(Status.CORRUPT, f"MuPDF cannot count its pages: {error}") from None

    def page_size(self, page_number: int) -> tuple[float, float]:
        rect = self.document[page_number - 1].rect
        return rect.width, rect.height

    def render(self, page_number: int, longest_edge: int) -> np.ndarray:
        import pymupdf

        page = self.document[page_number - 1]
        rows, columns = rendered_size((page.rect.width, page.rect.height), longest_edge)
        # MuPDF rounds the pixmap outwards: aim a hair under the exact size.
        matrix = pymupdf.Matrix((columns - 1e-3) / page.rect.width, (rows - 1e-3) / page.rect.height)
        pixmap = page.get_pixmap(matrix=matrix, colorspace=pymupdf.csRGB, alpha=False)
        rows = np.frombuffer(pixmap.samples, dtype=np.uint8).reshape(pixmap.height, pixmap.stride)
        return rows[:, : pixmap.width * 3].reshape(pixmap.height, pixmap.width, 3)

    def close(self) -> None:
        self.document.close()


class PopplerDocument:
    """pdf2image over poppler's pdfinfo/pdftoppm: the second backend, same contract."""

    _PAGE_SIZE = re.compile(r"^Page\s+(\d+)\s+size$")
    _PAGE_ROT = re.compile(r"^Page\s+(\d+)\s+rot$")

    def __init__(self, data: bytes, passwords: tuple[str, ...] = ()) -> None:
        from pdf2image import pdfinfo_from_bytes
        from pdf2image.exceptions import PDFInfoNotInstalledError, PDFPageCountError, PDFSyntaxError

        self.data = data
        self.repaired = False  # poppler does not say
        self.password: str | None = None
        for password in (None, *passwords):
            try:
                info = pdfinfo_from_bytes(data, userpw=password)
                self.password = password
                break
            except PDFInfoNotInstalledError:
                raise
            except (PDFPageCountError, PDFSyntaxError, ValueError) as error:
                message = str(error).strip()
                if "Incorrect password" not in message and "encrypted" not in message.lower():
                    raise DocumentError(Status.CORRUPT, f"poppler cannot open it: {message[:500]}") from None
        else:
            raise DocumentError(Status.ENCRYPTED, ENCRYPTED_REASON)
        self.num_pages = int(info.get("Pages", 0))
        self.sizes: dict[int, tuple[float, float]] = {}
        if self.num_pages:
            detail = pdfinfo_from_bytes(data, userpw=self.password, first_page=1, last_page=self.num_pages)
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

        rows, columns = rendered_size(self.sizes[page_number], longest_edge)
        [image] = convert_from_bytes(
            self.data,
            size=(columns, rows),
            first_page=page_number,
            last_page=page_number,
            fmt="ppm",
            userpw=self.password,
        )
        return np.asarray(image.convert("RGB"))

    def close(self) -> None:
        self.data = b""


def check_header(data: bytes) -> None:
    """Cheap checks before any parser sees the bytes: empty, or not a PDF by content (never by name)."""
    if not data:
        raise DocumentError(Status.EMPTY, "the file is empty (0 bytes)")
    if PDF_MAGIC not in data[:PDF_HEADER_WINDOW]:
        raise DocumentError(Status.NOT_PDF, f"no {PDF_MAGIC.decode()} header in the first {PDF_HEADER_WINDOW} bytes")


def open_pdf(data: bytes, backend: str, passwords: tuple[str, ...] = ()) -> PdfDocument:
    """Open a PDF with the configured backend, in this process; raises DocumentError."""
    check_header(data)
    document: PdfDocument = (PyMuPdfDocument if backend == "pymupdf" else PopplerDocument)(data, passwords)
    if document.num_pages == 0:
        document.close()
        raise DocumentError(Status.EMPTY, "the PDF has no pages")
    return document


def page_limit_violation(page_size: tuple[float, float], longest_edge: int, limits: LimitsConfig) -> str | None:
    """Why a page must not be rendered (checked from its size, before any pixel exists), or None."""
    width, height = page_size
    if min(width, height) <= 0:
        return f"page has no area ({width}x{height} pt)"
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        return f"page is {width:.0f}x{height:.0f} pt, over limits.max_aspect_ratio={limits.max_aspect_ratio}"
    rows, columns = rendered_size(page_size, longest_edge)
    if rows * columns > limits.max_pixels_per_page:
        return f"page renders to {columns}x{rows} px, over limits.max_pixels_per_page={limits.max_pixels_per_page}"
    return None


def rendered_size(page_size: tuple[float, float], longest_edge: int) -> tuple[int, int]:
    """(height, width) in pixels of a page rendered with its longest edge at ``longest_edge``; both
    backends render exactly this size."""
    width, height = page_size
    zoom = longest_edge / max(width, height)
    return min(longest_edge, max(1, round(height * zoom))), min(longest_edge, max(1, round(width * zoom)))


class RasterizeDocument:
    """Ray Data stage (flat_map): a read document → one row per rendered page, or one row saying why not."""

    def __init__(self, config: JobConfig, geometry: ImageGeometry, ledger=None) -> None:
        self.config = config
        self.geometry = geometry
        self.ledger = ledger  # the run's ledger: its page budget, and how the render helpers are isolated
        self.isolation_reported: set[int] = set()  # helper processes whose isolation the ledger has

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        base = {
            **{field: row[field] for field in DOCUMENT_FIELDS},
            "num_pages": 0,
            "page_number": 0,
            "document_rows": 1,
            "repaired": False,
            "status": row["status"],
            "error": row["error"],
            "render_ms": 0.0,
            "image": None,  # the rendered page, (H, W, 3) uint8
        }
        if row["status"] != Status.OK:
            return [base]
        limits, render = self.config.limits, self.config.render
        try:
            check_header(row["data"])
            document = SandboxedDocument(
                row["data"],
                render.backend,
                tuple(password.get_secret_value() for password in render.passwords),
                limits.render_memory_mb,
                limits.document_timeout_s,
            )
        except (DocumentError, SandboxFailure) as error:
            return [{**base, "status": error.status.value, "error": error.reason}]
        except Exception as error:  # noqa: BLE001 - whatever a hostile file makes the parser raise
            return [
                {**base, "status": Status.CORRUPT.value, "error": f"cannot open it: {type(error).__name__}: {error}"}
            ]
        self._report_isolation(document.sandbox)
        try:
            return self._render_pages(document, {**base, "repaired": document.repaired})
        except SandboxFailure as error:  # out of time: the document fails as a whole, partial pages dropped
            return [{**base, "status": error.status.value, "error": error.reason}]
        finally:
            document.close()

    def _report_isolation(self, sandbox: RenderSandbox) -> None:
        """Tell the run's ledger how a new helper process was isolated (once per helper)."""
        if self.ledger is not None and sandbox.process_id not in self.isolation_reported:
            self.isolation_reported.add(sandbox.process_id)
            self.ledger.record_isolation.remote(sandbox.isolation["network"])

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
        if self.ledger is not None and self.config.budget.max_pages is not None:
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
                too_large = page_limit_violation(document.page_size(page_number), longest_edge, limits)
                if too_large:
                    rows.append({**page_row, "status": Status.PAGE_TOO_LARGE.value, "error": too_large})
                    continue
                image = document.render(page_number, longest_edge)
            except SandboxFailure as error:
                if error.status == Status.TIMEOUT:
                    raise
                rows.append({**page_row, "status": error.status.value, "error": f"page {page_number}: {error.reason}"})
                continue
            except Exception as error:  # noqa: BLE001 - one bad page must not fail its document
                reason = f"cannot render page {page_number}: {type(error).__name__}: {error}"
                rows.append({**page_row, "status": Status.RENDER_ERROR.value, "error": reason})
                continue
            rows.append({**page_row, "render_ms": (time.perf_counter() - started) * 1000, "image": image})
        return rows
