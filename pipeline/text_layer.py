"""A page's own text layer, as answers use it: whether it is usable in place of the model (questions with
``source: auto``), and where an answer is on the page (its evidence).

Matching is ours (answers against the words MuPDF found on the same page): words and answer are compared
after normalizing case, whitespace and punctuation, so ``$1,234.50``, ``1.234,50`` and ``1234.50`` match
the same digits, and ``ACME Corp.`` matches ``Acme Corp``. A fuzzy matcher (rapidfuzz) was considered: it
would report near misses as evidence, and a box users check an answer against must hold the answer."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
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
    return "".join(filter(str.isalnum, text.casefold()))


def find_evidence(answer: str | None, words: list[str], boxes: list[float], source: str = TEXT_LAYER) -> dict[str, Any]:
    """The evidence columns of ``answer`` on a page with these words (boxes: 4 fractions per word) read from
    ``source`` (the text layer, or OCR): the first run of consecutive words, in reading order, that reads as
    the answer once normalized.

    The words' normalized forms are joined into one string and the answer's occurrences in it are taken in
    order (``_occurrences``, linear in the page and the answer), keeping the first that starts at the start
    of a word and ends at the end of one. Word by word, or retrying ``str.find`` one character after each
    occurrence, a page of many words that each begin the answer took time of the page's length times the
    answer's."""
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
    for found in _occurrences("".join(keys), target):
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
    return dict(NO_EVIDENCE_COLUMNS)


def _occurrences(text: str, target: str) -> Iterator[int]:
    """Every offset where ``target`` occurs in ``text``, in order, in time linear in both.

    ``str.find`` is linear for one search, but each search also compares the whole target once more, so
    searching again one character after each occurrence costs ``len(text) * len(target)`` on a text where
    the target occurs everywhere ("aaaa…"). Here, when the target repeats with a period ``p`` of at most
    half its length, the occurrence ``p`` further is checked on its last ``p`` characters only, and once
    that fails the next occurrence cannot start before ``len(target) - p`` characters on (two overlapping
    occurrences of a word ``p``-periodic that far apart are a multiple of ``p`` apart, Fine and Wilf), so
    ``find`` resumes there; otherwise occurrences are at least half the target apart and resuming one
    character on is linear already."""
    found = text.find(target)
    if found < 0:
        return
    yield found
    length, period = len(target), _smallest_period(target)
    if 2 * period > length:
        while (found := text.find(target, found + 1)) >= 0:
            yield found
        return
    tail = target[length - period :]
    while True:
        while text.startswith(tail, found + length):
            found += period
            yield found
        found = text.find(target, found + length - period + 1)
        if found < 0:
            return
        yield found


def _smallest_period(text: str) -> int:
    """The smallest ``p`` > 0 with ``text[i] == text[i + p]`` wherever both exist (Knuth-Morris-Pratt's
    failure function: the length less the longest proper prefix that is also a suffix)."""
    border = [0] * len(text)
    matched = 0
    for index in range(1, len(text)):
        while matched and text[index] != text[matched]:
            matched = border[matched - 1]
        if text[index] == text[matched]:
            matched += 1
        border[index] = matched
    return len(text) - border[-1]
