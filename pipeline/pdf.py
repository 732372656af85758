"""The PDF code the render helper runs (pipeline/sandbox.py): the contract every opened document keeps
(``SourceDocument``, image files too: pipeline/image_files.py), the two PDF backends behind it (``open_pdf``),
PyMuPDF (default) and pdf2image/poppler, and the page size rules. Failures are ``DocumentError`` with their
status. Nothing here knows of Ray or of the helper."""

from __future__ import annotations

import re
from typing import Protocol

import numpy as np

from pipeline.ocr import ocr_pdf_page, ocr_pixels
from pipeline.records import DocumentError, Status
from pipeline.words import NO_TEXT_LAYER, TextLayer, pymupdf_text_layer

ENCRYPTED_REASON = "the PDF is encrypted and needs a password (none of render.passwords opened it)"


class SourceDocument(Protocol):
    """A document opened in the render helper: a PDF, or an image file."""

    num_pages: int
    repaired: bool  # the parser had to repair the file to open it
    source_format: str  # pdf, tiff, png ... (pipeline/formats.py)

    def page_info(self, page_number: int) -> dict[str, float | int | None]:
        """``width`` and ``height`` in points, rotation applied; for an image page also its own ``pixels``
        and the ``dpi`` its header states (None for a PDF page, or a header without one)."""

    def page_size(self, page_number: int) -> tuple[float, float]:
        """(width, height) in points, rotation applied."""

    def render(self, page_number: int, longest_edge: int) -> np.ndarray:
        """The page as (H, W, 3) uint8 RGB of exactly ``rendered_size(page_size, longest_edge)``."""

    def text_layer(self, page_number: int) -> TextLayer:
        """The page's own text (PyMuPDF's, for both PDF backends; none for an image)."""

    def ocr(self, page_number: int, language: str, dpi: int, tessdata: str) -> TextLayer:
        """The page's words as Tesseract reads them at ``dpi`` (pipeline/ocr.py)."""

    def close(self) -> None: ...


def pdf_page_info(width: float, height: float) -> dict[str, float | int | None]:
    return {"width": width, "height": height, "pixels": None, "dpi": None}


class PyMuPdfDocument:
    source_format = "pdf"

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

    def page_info(self, page_number: int) -> dict[str, float | int | None]:
        return pdf_page_info(*self.page_size(page_number))

    def render(self, page_number: int, longest_edge: int) -> np.ndarray:
        import pymupdf

        page = self.document[page_number - 1]
        rows, columns = rendered_size((page.rect.width, page.rect.height), longest_edge)
        # MuPDF rounds the pixmap outwards: aim a hair under the exact size.
        matrix = pymupdf.Matrix((columns - 1e-3) / page.rect.width, (rows - 1e-3) / page.rect.height)
        pixmap = page.get_pixmap(matrix=matrix, colorspace=pymupdf.csRGB, alpha=False)
        rows = np.frombuffer(pixmap.samples, dtype=np.uint8).reshape(pixmap.height, pixmap.stride)
        return rows[:, : pixmap.width * 3].reshape(pixmap.height, pixmap.width, 3)

    def text_layer(self, page_number: int) -> TextLayer:
        return pymupdf_text_layer(self.document[page_number - 1])

    def ocr(self, page_number: int, language: str, dpi: int, tessdata: str) -> TextLayer:
        return ocr_pdf_page(self.document[page_number - 1], language, dpi, tessdata)

    def close(self) -> None:
        self.document.close()


def decrypted(data: bytes, passwords: tuple[str, ...]) -> bytes:
    """An encrypted PDF's bytes without its encryption, opened by MuPDF with the first password that fits."""
    import pymupdf

    try:
        document = pymupdf.open(stream=data, filetype="pdf")
    except Exception as error:  # noqa: BLE001 - MuPDF raises several types for broken files
        raise DocumentError(Status.CORRUPT, f"MuPDF cannot open it to decrypt it: {error}") from None
    try:
        if document.needs_pass and not any(document.authenticate(password) for password in passwords):
            raise DocumentError(Status.ENCRYPTED, ENCRYPTED_REASON)
        return document.tobytes(encryption=pymupdf.PDF_ENCRYPT_NONE)
    finally:
        document.close()


class PopplerDocument:
    """pdf2image over poppler's pdfinfo/pdftoppm: the second backend, same contract."""

    source_format = "pdf"

    _PAGE_SIZE = re.compile(r"^Page\s+(\d+)\s+size$")
    _PAGE_ROT = re.compile(r"^Page\s+(\d+)\s+rot$")

    def __init__(self, data: bytes, passwords: tuple[str, ...] = ()) -> None:
        from pdf2image import pdfinfo_from_bytes
        from pdf2image.exceptions import PDFInfoNotInstalledError, PDFPageCountError, PDFSyntaxError

        # Opened for the text layer when first asked; None: not yet, False: MuPDF cannot open the file.
        self.text_document: PyMuPdfDocument | bool | None = None
        self.repaired = False  # poppler does not say
        try:
            info = pdfinfo_from_bytes(data)
        except PDFInfoNotInstalledError:
            raise
        except (PDFPageCountError, PDFSyntaxError, ValueError) as error:
            message = str(error).strip()
            if "Incorrect password" not in message and "encrypted" not in message.lower():
                raise DocumentError(Status.CORRUPT, f"poppler cannot open it: {message[:500]}") from None
            # Encrypted: MuPDF decrypts it with the passwords, so that no password is ever on poppler's command
            # line (where any process of the machine could read it).
            data = decrypted(data, passwords)
            info = pdfinfo_from_bytes(data)
        self.data = data
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

    def page_info(self, page_number: int) -> dict[str, float | int | None]:
        return pdf_page_info(*self.page_size(page_number))

    def render(self, page_number: int, longest_edge: int) -> np.ndarray:
        rows, columns = rendered_size(self.sizes[page_number], longest_edge)
        return np.asarray(self._pdftoppm(page_number, size=(columns, rows)).convert("RGB"))

    def _pdftoppm(self, page_number: int, **options):
        from pdf2image import convert_from_bytes

        [image] = convert_from_bytes(self.data, first_page=page_number, last_page=page_number, fmt="ppm", **options)
        return image

    def ocr(self, page_number: int, language: str, dpi: int, tessdata: str) -> TextLayer:
        """Poppler renders the page at ``dpi``, Tesseract reads it (MuPDF need not open the file)."""
        return ocr_pixels(self._pdftoppm(page_number, dpi=dpi).convert("RGB"), dpi, language, dpi, tessdata)

    def text_layer(self, page_number: int) -> TextLayer:
        """PyMuPDF's text of the page: poppler's own (``pdftotext -bbox``) would need its XHTML parsed and a
        second word-splitting rule; one text layer for both backends keeps answers and evidence the same.
        A file MuPDF cannot open has no text layer here."""
        if self.text_document is None:
            try:
                self.text_document = PyMuPdfDocument(self.data)
            except DocumentError:
                self.text_document = False  # tried once per document, not once per page
        if self.text_document is False:
            return NO_TEXT_LAYER
        return self.text_document.text_layer(page_number)

    def close(self) -> None:
        self.data = b""
        if isinstance(self.text_document, PyMuPdfDocument):
            self.text_document.close()


def open_pdf(data: bytes, backend: str, passwords: tuple[str, ...] = ()) -> SourceDocument:
    """Open a PDF (pipeline/formats.py found its header) with the configured backend, in this process;
    raises DocumentError."""
    document: SourceDocument = (PyMuPdfDocument if backend == "pymupdf" else PopplerDocument)(data, passwords)
    if document.num_pages == 0:
        document.close()
        raise DocumentError(Status.EMPTY, "the PDF has no pages")
    return document


def rendered_size(page_size: tuple[float, float], longest_edge: int) -> tuple[int, int]:
    """(height, width) in pixels of a page rendered with its longest edge at ``longest_edge``; both
    backends render exactly this size."""
    width, height = page_size
    zoom = longest_edge / max(width, height)
    return min(longest_edge, max(1, round(height * zoom))), min(longest_edge, max(1, round(width * zoom)))
