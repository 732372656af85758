"""What a document is, told by its bytes and never by its name, and the one function that opens it (in the
render helper): a PDF (pipeline/pdf.py) or an image file of a format Pillow decodes (pipeline/image_files.py).

The type is named by ``filetype`` (a maintained signature matcher; it also tells a DOCX from a plain ZIP by
looking inside, so a refused file is named as what it is), except for PDFs, found as readers find them: a
``%PDF-`` header anywhere in the first 1,024 bytes. Anything else is ``unsupported_format``, with the type
that was detected.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.records import DocumentError, Status

PDF = "pdf"
PDF_MAGIC = b"%PDF-"
PDF_HEADER_WINDOW = 1024  # readers accept the header anywhere in the first 1024 bytes


@dataclass(frozen=True)
class ImageFormat:
    """An image format docqa reads: its name in the rows (``source_format``), the plugin Pillow opens it
    with (only that one: a file is never decoded as another format than the one it was told to be), and
    whether its further frames are pages (TIFF) or not (an animated GIF or WebP is its first frame)."""

    name: str
    pillow_format: str
    frames_are_pages: bool = False


# filetype's name for a type → the format. HEIF through pillow-heif (registered where it is installed).
IMAGE_FORMATS = {
    "tif": ImageFormat("tiff", "TIFF", frames_are_pages=True),
    "png": ImageFormat("png", "PNG"),
    "apng": ImageFormat("png", "PNG"),
    "jpg": ImageFormat("jpeg", "JPEG"),
    "webp": ImageFormat("webp", "WEBP"),
    "bmp": ImageFormat("bmp", "BMP"),
    "gif": ImageFormat("gif", "GIF"),
    "jpx": ImageFormat("jp2", "JPEG2000"),
    "heic": ImageFormat("heif", "HEIF"),
    "avif": ImageFormat("avif", "AVIF"),
}
SUPPORTED_FORMATS = (PDF, *sorted({image.name for image in IMAGE_FORMATS.values()}))
# Signatures filetype does not know: a bare JPEG 2000 codestream (.j2k; it knows the jp2 box) and BigTIFF.
OWN_SIGNATURES = {b"\xff\x4f\xff\x51": "jpx", b"II\x2b\x00": "tif", b"MM\x00\x2b": "tif"}


def detect_format(data: bytes) -> str:
    """The format of ``data``: ``pdf``, a key of IMAGE_FORMATS, or raises DocumentError (``empty``, or
    ``unsupported_format`` naming what was detected)."""
    if not data:
        raise DocumentError(Status.EMPTY, "the file is empty (0 bytes)")
    if PDF_MAGIC in data[:PDF_HEADER_WINDOW]:
        return PDF
    for signature, detected in OWN_SIGNATURES.items():
        if data.startswith(signature):
            return detected
    import filetype

    kind = filetype.guess(data)
    if kind is not None and kind.extension in IMAGE_FORMATS:
        return kind.extension
    detected = f"{kind.extension} ({kind.mime})" if kind is not None else _unrecognized(data)
    supported = ", ".join(SUPPORTED_FORMATS)
    raise DocumentError(Status.UNSUPPORTED_FORMAT, f"detected {detected}; docqa reads {supported}")


def _unrecognized(data: bytes) -> str:
    head = data[:512]
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return f"no known type (it starts with {data[:8]!r})"
    return "text, no known type"


def source_format_of(detected: str) -> str:
    """The name a detected format has in the rows."""
    return PDF if detected == PDF else IMAGE_FORMATS[detected].name
