"""A page's words as the pipeline carries them (``TextLayer``): its text, its words in reading order and
their boxes, whether they come from a PDF's own text layer (pipeline/pdf.py) or from OCR (pipeline/ocr.py).
Imported on both sides of the render helper's boundary; it imports nothing of docqa."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextLayer:
    """A page's text layer: its text and its words in reading order (MuPDF's ``sort=True``: blocks top to
    bottom, left to right), each word's box as fractions of the page (x0, y0, x1, y1, rotation applied)."""

    text: str
    words: list[str]
    boxes: list[float]  # 4 per word

    @property
    def chars(self) -> int:
        """Non-space characters: 0 for a scanned page."""
        return sum(not character.isspace() for character in self.text)


NO_TEXT_LAYER = TextLayer("", [], [])


def pymupdf_text_layer(page) -> TextLayer:
    """A PyMuPDF page's text layer."""
    import pymupdf

    width, height = page.rect.width, page.rect.height
    words, boxes = [], []
    text_page = page.get_textpage()  # extracted once for both readings (a third of the time of a small page)
    rotation = page.rotation_matrix if page.rotation else None
    for x0, y0, x1, y1, word, *_ in page.get_text("words", sort=True, textpage=text_page):
        if rotation is not None:
            x0, y0, x1, y1 = pymupdf.Rect(x0, y0, x1, y1) * rotation
        words.append(word)
        boxes += [x0 / width, y0 / height, x1 / width, y1 / height]
    return TextLayer(page.get_text("text", sort=True, textpage=text_page), words, boxes)
