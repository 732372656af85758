"""OCR of a page, in the render helper: Tesseract's words and their boxes as a ``TextLayer``, the same record
a PDF's own text layer is, so answers from text, evidence and ``text_layer_chars`` work on scans unchanged.

Tesseract through PyMuPDF (its wheels link Tesseract in; Debian's ``tesseract-ocr`` packages supply the
trained language data) rather than pytesseract: pytesseract runs the ``tesseract`` program and reads its
output back from files, and the helper that parses hostile bytes may not exec (its seccomp filter refuses it
with the PyMuPDF backend) nor needs to write files; PyMuPDF's OCR runs in the helper's own process under its
limits, and gives words in the shape of MuPDF's text layer (the same word splitting as born-digital pages).
The pixels are turned into a one-page PDF whose invisible text is Tesseract's (``Pixmap.pdfocr_tobytes``),
and that page's words are read as any PDF page's are.
"""

from __future__ import annotations

from pipeline.words import TextLayer, pymupdf_text_layer

A4_LONG_SIDE_INCHES = 11.7  # an image without a resolution is read as if its long side were this long at most


def ocr_pixmap(pixmap, language: str, tessdata: str) -> TextLayer:
    """The words Tesseract reads in an RGB ``pixmap`` (its resolution set), boxes as fractions of it."""
    import pymupdf

    ocr_pdf = pymupdf.open(stream=pixmap.pdfocr_tobytes(compress=False, language=language, tessdata=tessdata))
    try:
        return pymupdf_text_layer(ocr_pdf[0])
    finally:
        ocr_pdf.close()


def ocr_pdf_page(page, language: str, dpi: int, tessdata: str) -> TextLayer:
    """A PDF page rendered at ``dpi`` (upright, as its text layer's boxes are) and read by Tesseract."""
    import pymupdf

    return ocr_pixmap(page.get_pixmap(dpi=dpi, colorspace=pymupdf.csRGB, alpha=False), language, tessdata)


def ocr_pixels(image, own_dpi: float | None, language: str, dpi: int, tessdata: str) -> TextLayer:
    """An upright RGB Pillow image read by Tesseract at most at ``dpi``: a finer scan is scaled down (OCR
    time grows with the pixels, and Tesseract reads print best near 300 dpi); one without a resolution is
    scaled down only if its long side holds more than an A4 page's at ``dpi``."""
    import pymupdf
    from PIL import Image

    width, height = image.size
    if own_dpi is not None:
        scale, resolution = min(1.0, dpi / own_dpi), min(own_dpi, dpi)
    else:
        scale = min(1.0, A4_LONG_SIDE_INCHES * dpi / max(width, height))
        resolution = dpi
    if scale < 1.0:
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)
    image = image.convert("RGB")  # Tesseract through MuPDF reads RGB pixmaps (a gray one gives no words)
    pixmap = pymupdf.Pixmap(pymupdf.csRGB, image.width, image.height, image.tobytes(), False)
    pixmap.set_dpi(round(resolution), round(resolution))
    return ocr_pixmap(pixmap, language, tessdata)
