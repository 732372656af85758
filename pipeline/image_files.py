"""Image files as documents, in the render helper: TIFF (each frame a page; uncompressed, LZW, Deflate,
JPEG-in-TIFF, CCITT G3/G4), PNG, JPEG, WebP, BMP, GIF, JPEG 2000, HEIF and AVIF, decoded by Pillow.

Pillow opens a file lazily: ``Image.open`` reads the header (size, mode, resolution, EXIF orientation) and
no pixel. Two guards refuse a page too large from that header, before any pixel is decoded, both as
``page_too_large``: Pillow's own decompression-bomb guard, left on, raises ``DecompressionBombError`` in
``Image.open`` when the first frame claims more than twice ``Image.MAX_IMAGE_PIXELS`` (about 179 Mpx: a PNG
whose header claims 50,000 x 50,000 is refused there, with Pillow's message); below that, the rendering
stage refuses a page over ``limits.max_pixels_per_page`` from ``page_info`` (a 10,000 x 9,000 PNG at the
default 80 Mpx; also any TIFF frame after the first, which Pillow does not check at open). Each file is
opened only by the plugin of the format it was detected as (pipeline/formats.py). EXIF orientation is
applied: a phone photo taken sideways is an upright page, and its size is the upright one.

A page's size in points is its pixels at the resolution its header states (72 dpi where it states none or
an implausible one), so that pages of image files and of PDFs are sized and rendered by the same rules.
"""

from __future__ import annotations

import io

import numpy as np

from pipeline.formats import ImageFormat
from pipeline.ocr import ocr_pixels
from pipeline.pdf import rendered_size
from pipeline.records import DocumentError, Status
from pipeline.words import NO_TEXT_LAYER, TextLayer

DEFAULT_DPI = 72.0  # a header without a resolution: one pixel per point
PLAUSIBLE_DPI = (36.0, 4800.0)  # outside this, a header's resolution is taken as absent (some write 1 or 0)
EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations whose upright image swaps width and height


def _register_heif() -> None:
    try:
        from pillow_heif import register_heif_opener
    except ImportError:  # pillow-heif is not installed here: HEIF files fail to open (render_error)
        return
    register_heif_opener()


class ImageDocument:
    """An image file opened with Pillow: the ``SourceDocument`` contract of pipeline/pdf.py, plus the image's
    own pixel count and resolution per page (``page_info``)."""

    def __init__(self, data: bytes, image_format: ImageFormat) -> None:
        from PIL import Image, UnidentifiedImageError

        if image_format.pillow_format == "HEIF":
            _register_heif()
        self.source_format = image_format.name
        self.repaired = False
        try:
            self.image = Image.open(io.BytesIO(data), formats=[image_format.pillow_format])
            frames = getattr(self.image, "n_frames", 1) if image_format.frames_are_pages else 1
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise DocumentError(Status.CORRUPT, f"Pillow cannot open it as {image_format.name}: {error}") from None
        except Image.DecompressionBombError as error:
            raise DocumentError(Status.PAGE_TOO_LARGE, str(error)) from None
        self.num_pages = int(frames)

    def _frame(self, page_number: int):
        try:
            self.image.seek(page_number - 1)
        except (EOFError, OSError, ValueError) as error:
            raise DocumentError(Status.RENDER_ERROR, f"cannot read image frame {page_number}: {error}") from None
        return self.image

    def _dpi(self) -> float | None:
        resolution = self.image.info.get("dpi")
        try:
            dpi = float(resolution[0]) if resolution else None
        except (TypeError, ValueError, IndexError):
            return None
        return dpi if dpi is not None and PLAUSIBLE_DPI[0] <= dpi <= PLAUSIBLE_DPI[1] else None

    def _transposed(self, frame) -> bool:
        """Whether the frame's EXIF orientation turns it a quarter, read without decoding a pixel (Pillow's
        ``getexif`` on a PNG decodes the image to look for an eXIf chunk after the pixels: only one met
        before them counts here)."""
        from PIL import Image

        if frame.format == "PNG":
            exif = Image.Exif()
            if frame.info.get("exif"):
                exif.load(frame.info["exif"])
        else:
            exif = frame.getexif()
        return exif.get(EXIF_ORIENTATION) in TRANSPOSED_ORIENTATIONS

    def page_info(self, page_number: int) -> dict[str, float | int | None]:
        """The page's size in points (upright), its pixel count and resolution, from the header alone."""
        frame = self._frame(page_number)
        width, height = frame.size
        if self._transposed(frame):
            width, height = height, width
        dpi = self._dpi()
        scale = 72.0 / (dpi or DEFAULT_DPI)
        return {"width": width * scale, "height": height * scale, "pixels": width * height, "dpi": dpi}

    def page_size(self, page_number: int) -> tuple[float, float]:
        info = self.page_info(page_number)
        return float(info["width"]), float(info["height"])

    def _upright(self, page_number: int, reduce_to: tuple[int, int] | None = None):
        """The page's pixels, decoded now, upright, RGB. ``reduce_to``: (width, height) the caller will
        resize to; a JPEG is then decoded at the smallest DCT scale above it (Pillow's draft mode)."""
        from PIL import Image, ImageOps

        frame = self._frame(page_number)
        if reduce_to is not None and frame.format == "JPEG":
            frame.draft("RGB", reduce_to[::-1] if self._transposed(frame) else reduce_to)
        try:
            upright = ImageOps.exif_transpose(frame)
            return upright.convert("RGB")
        except Image.DecompressionBombError as error:
            raise DocumentError(Status.PAGE_TOO_LARGE, str(error)) from None
        except (OSError, SyntaxError, ValueError) as error:
            raise DocumentError(Status.RENDER_ERROR, f"cannot decode image frame {page_number}: {error}") from None

    def render(self, page_number: int, longest_edge: int) -> np.ndarray:
        from PIL import Image

        rows, columns = rendered_size(self.page_size(page_number), longest_edge)
        image = self._upright(page_number, (columns, rows))
        if image.size != (columns, rows):
            image = image.resize((columns, rows), Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.asarray(image)

    def text_layer(self, page_number: int) -> TextLayer:
        return NO_TEXT_LAYER  # an image has none; OCR reads one (``ocr``)

    def ocr(self, page_number: int, language: str, dpi: int, tessdata: str) -> TextLayer:
        """The page's words as Tesseract reads them, at most at ``dpi`` (a finer scan is scaled down to it)."""
        return ocr_pixels(self._upright(page_number), self._dpi(), language, dpi, tessdata)

    def close(self) -> None:
        self.image.close()
