"""A page's own text layer, as answers use it: whether it is usable in place of the model (questions with
``source: auto``), and where an answer is on the page (its evidence).

Matching is ours (answers against the words MuPDF found on the same page): words and answer are compared
after normalizing case, whitespace and punctuation, so ``$1,234.50``, ``1.234,50`` and ``1234.50`` match
the same digits, and ``ACME Corp.`` matches ``Acme Corp``. A fuzzy matcher (rapidfuzz) was considered: it
would report near misses as evidence, and a box users check an answer against must hold the answer."""

from __future__ import annotations

import unicodedata
from typing import Any

from pipeline.config import TextLayerConfig

TEXT_LAYER, OCR, NO_EVIDENCE = "text_layer", "ocr", "none"  # where a page's words come from, or none
NO_EVIDENCE_COLUMNS = {"evidence": NO_EVIDENCE, "evidence_text": None, "evidence_bbox": None}


def non_space(text: str) -> list[str]:
    return [character for character in text if not character.isspace()]


def is_usable(text: str, config: TextLayerConfig) -> bool:
    """Whether a page's text layer can stand for the page: at least ``min_chars`` non-space characters, of
    which at least ``min_readable_share`` are readable (Unicode letters, digits, punctuation, symbols; not
    U+FFFD, control or private-use characters, what glyphs without a Unicode mapping extract to)."""
    characters = non_space(text)
    if len(characters) < config.min_chars:
        return False
    readable = sum(unicodedata.category(c)[0] in "LNPS" and c != "\ufffd" for c in characters)
    return readable >= config.min_readable_share * len(characters)


def normalized(text: str) -> str:
    """Letters and digits only, case folded: what an answer and the page's words are compared on."""
    return "".join(character for character in text.casefold() if character.isalnum())


def find_evidence(answer: str | None, words: list[str], boxes: list[float], source: str = TEXT_LAYER) -> dict[str, Any]:
    """The evidence columns of ``answer`` on a page with these words (boxes: 4 fractions per word) read from
    ``source`` (the text layer, or OCR): the first run of consecutive words, in reading order, that reads as
    the answer once normalized.

    The words' normalized forms are joined into one string and the answer is looked for in it (``str.find``,
    linear in the page), keeping only a match that starts at the start of a word and ends at the end of one:
    the time is near-linear in the page's text whatever the page holds (word by word, a page of many words
    that each begin the answer took quadratic time)."""
    target = normalized(answer or "")
    if not target:
        return dict(NO_EVIDENCE_COLUMNS)
    keys = [normalized(word) for word in words]
    starts, ends = {}, {}  # offset in the joined text -> the first word starting there / the last ending there
    offset = 0
    for index, key in enumerate(keys):
        if key:
            starts.setdefault(offset, index)
            offset += len(key)
            ends[offset] = index
    joined = "".join(keys)
    found = joined.find(target)
    while found >= 0:
        first, last = starts.get(found), ends.get(found + len(target))
        if first is not None and last is not None:
            corners = [boxes[4 * index : 4 * index + 4] for index in range(first, last + 1)]
            bbox = {
                "x0": min(box[0] for box in corners),
                "y0": min(box[1] for box in corners),
                "x1": max(box[2] for box in corners),
                "y1": max(box[3] for box in corners),
            }
            return {"evidence": source, "evidence_text": " ".join(words[first : last + 1]), "evidence_bbox": bbox}
        found = joined.find(target, found + 1)
    return dict(NO_EVIDENCE_COLUMNS)
