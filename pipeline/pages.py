"""Page selections such as ``all``, ``first``, ``last`` or ``"1-3,-1"`` (negative numbers count from the end)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_RANGE = re.compile(r"^\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?$")
_NAMED = {"all": "1--1", "first": "1", "last": "-1"}


@dataclass(frozen=True)
class PageRange:
    """An inclusive range of 1-based page numbers; negative numbers count from the last page (-1)."""

    start: int
    end: int

    def contains(self, page_number: int, num_pages: int) -> bool:
        start = self.start if self.start > 0 else num_pages + 1 + self.start
        end = self.end if self.end > 0 else num_pages + 1 + self.end
        return start <= page_number <= end


def parse_page_selection(spec: str | int | list[str | int]) -> tuple[PageRange, ...]:
    """Parse a page selection; raises ValueError with the offending part named."""
    parts: list[str]
    if isinstance(spec, bool):
        raise ValueError(f"page selection must be a string, a number or a list, not {spec!r}")
    if isinstance(spec, int):
        parts = [str(spec)]
    elif isinstance(spec, str):
        parts = _NAMED.get(spec.strip().lower(), spec).split(",")
    else:
        parts = [str(item) for item in spec]
    if not parts or all(not part.strip() for part in parts):
        raise ValueError("page selection is empty")
    ranges = []
    for part in parts:
        part = _NAMED.get(part.strip().lower(), part)
        match = _RANGE.match(part)
        if not match:
            raise ValueError(f"invalid page range {part!r}: use all, first, last, N, A-B, or -N for the N-th last page")
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) is not None else start
        if start == 0 or end == 0:
            raise ValueError(f"invalid page range {part!r}: pages are numbered from 1 (or from -1 for the last page)")
        if start > 0 and end > 0 and end < start:
            raise ValueError(f"invalid page range {part!r}: the range ends before it starts")
        ranges.append(PageRange(start, end))
    return tuple(ranges)


def selection_contains(ranges: tuple[PageRange, ...], page_number: int, num_pages: int) -> bool:
    return any(page_range.contains(page_number, num_pages) for page_range in ranges)
