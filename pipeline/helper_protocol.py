"""The messages between a worker and its render helper (pipeline/sandbox.py ⇄ pipeline/render_helper.py).

Each message is a frame: a 4-byte big-endian length, then a msgpack map (msgpack: a maintained binary format
with typed values and limits on what it decodes; pickle, which the channel used before, runs code when a
crafted message is loaded). Pixels do not travel in frames: the helper writes them into the shared memory
buffer and names their shape.

The helper is where hostile bytes are parsed, so everything it sends is untrusted: ``read_frame`` reads with
a deadline on every read and refuses a frame over its limit without reading it; ``checked_answer`` takes an
answer only when every field has the type and the bounds its operation allows, and turns anything else into
``render_error`` (the worker then replaces the helper), as is a message cut short (a frame begun and not
complete by the deadline, or ended by the helper's death). A helper that sends nothing by the deadline is
``timeout``: a slow page, not a broken message. Requests from the worker are checked the same way by
the helper (``checked_request``), though the worker is trusted.
"""

from __future__ import annotations

import math
import os
import select
import struct
import time
from typing import Any

import msgpack

from pipeline.records import DocumentError, Status

LENGTH = struct.Struct(">I")
MAX_REQUEST_BYTES = 512 * 1024 * 1024  # a document (limits.max_file_bytes is at most this), passwords, a page number
MAX_ANSWER_BYTES = 16 * 1024 * 1024  # a text layer at its caps fits with room to spare
# A page's text layer, capped in the helper (what is past the caps is dropped; the page is kept).
MAX_TEXT_CHARS = 1_000_000
MAX_WORDS = 100_000
MAX_WORD_CHARS = 1_000
MAX_REASON_CHARS = 2_000
MAX_PAGES = 1_000_000
OPERATIONS = ("open", "page_info", "text_layer", "ocr", "render", "close", "isolation")
SOURCE_FORMATS = ("pdf", "tiff", "png", "jpeg", "webp", "bmp", "gif", "jp2", "heif", "avif")  # pipeline/formats.py
MAX_PAGE_PIXELS = 1 << 40
MAX_DPI = 1e5


class ProtocolError(Exception):
    """A frame or a message that is not what the protocol allows."""


class HelperException(RuntimeError):
    """The parser raised an exception of its own in the helper (its type and message, as text)."""


def encode(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return LENGTH.pack(len(body)) + body


def write_frame(fd: int, message: dict[str, Any]) -> None:
    """Write one frame (blocking; a pipe's reader that went away raises BrokenPipeError)."""
    view = memoryview(encode(message))
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_exactly(fd: int, count: int, deadline: float, frame_begun: bool = False) -> bytes:
    """``count`` bytes from a non-blocking ``fd`` by ``deadline``: past it, TimeoutError if no byte of the frame
    had come (the other side is busy or silent), ProtocolError if the frame had begun (a truncated message);
    EOFError if the other side closed first."""
    chunks, left = [], count
    while left:
        remaining = deadline - time.monotonic()
        ready = select.select([fd], [], [], max(remaining, 0))[0]  # past the deadline: only what has come
        if not ready:
            if frame_begun or chunks:
                raise ProtocolError(f"a truncated message: {count - left} of {count} bytes came by the deadline")
            raise TimeoutError
        try:
            chunk = os.read(fd, min(left, 1 << 20))
        except BlockingIOError:
            continue
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, deadline: float, limit: int) -> dict[str, Any]:
    """One frame's message, read with ``deadline`` for the whole frame; a frame longer than ``limit`` is refused
    before its body is read (ProtocolError), as is a body that is not one msgpack map, and a frame that began
    but was not complete by the deadline."""
    (length,) = LENGTH.unpack(_read_exactly(fd, LENGTH.size, deadline))
    if length > limit:
        raise ProtocolError(f"a frame of {length} bytes, over the {limit} allowed")
    body = _read_exactly(fd, length, deadline, frame_begun=True)
    try:
        message = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_bin_len=limit,
            max_str_len=limit,
            max_array_len=max(4 * MAX_WORDS, 16),
            max_map_len=64,
            max_ext_len=0,
        )
    except Exception as error:  # noqa: BLE001 - msgpack raises several types for malformed input
        raise ProtocolError(f"not a msgpack message: {type(error).__name__}: {error}"[:300]) from None
    if not isinstance(message, dict):
        raise ProtocolError(f"a message must be a map, not {type(message).__name__}")
    return message


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise ProtocolError(what)


def _string(value: Any, limit: int, what: str) -> str:
    _expect(isinstance(value, str) and len(value) <= limit, f"{what} is not a string of at most {limit} characters")
    return value


def _integer(value: Any, low: int, high: int, what: str) -> int:
    _expect(type(value) is int and low <= value <= high, f"{what} is not an integer in [{low}, {high}]")
    return value


def _number(value: Any, low: float, high: float, what: str) -> float:
    _expect(
        type(value) in (int, float) and math.isfinite(value) and low <= value <= high,
        f"{what} is not a finite number in [{low}, {high}]",
    )
    return float(value)


def checked_request(message: dict[str, Any]) -> tuple[str, list[Any]]:
    """(operation, arguments) of a request, as the helper takes it."""
    operation = message.get("op")
    _expect(operation in OPERATIONS, f"unknown operation {operation!r}")
    arguments = message.get("args", [])
    _expect(isinstance(arguments, list) and len(arguments) <= 8, "arguments are not a short list")
    return operation, arguments


def checked_answer(operation: str, message: dict[str, Any], pixel_buffer_bytes: int) -> Any:
    """The value of the helper's answer to ``operation``, every field checked; a failure it reports is raised
    as its DocumentError. Anything the protocol does not allow raises ProtocolError."""
    _expect(set(message) <= {"ok", "value", "status", "reason", "exception"}, f"unexpected fields {sorted(message)}")
    if message.get("ok") is not True:
        _expect(message.get("ok") is False, "no ok field")
        if "exception" in message:
            raise HelperException(_string(message["exception"], MAX_REASON_CHARS, "the exception"))
        status = _string(message.get("status"), 32, "the failure's status")
        _expect(status in {s.value for s in Status} and status != Status.OK, f"unknown status {status!r}")
        raise DocumentError(status, _string(message.get("reason"), MAX_REASON_CHARS, "the failure's reason"))
    value = message.get("value")
    if operation in ("start", "isolation"):
        _expect(isinstance(value, dict) and len(value) <= 32, "the isolation report is not a small map")
        report = {}
        for key, item in value.items():
            _string(key, 64, "a report key")
            if isinstance(item, list):
                _expect(len(item) <= 256, f"report field {key} is too long")
                report[key] = [_string(element, 500, f"an element of report field {key}") for element in item]
            elif isinstance(item, bool):
                report[key] = item
            else:
                report[key] = _string(item, 2000, f"report field {key}")
        return report
    if operation == "open":
        _expect(isinstance(value, list) and len(value) == 3, "open's answer is not [pages, repaired, format]")
        _expect(value[2] in SOURCE_FORMATS, f"unknown source format {value[2]!r}")
        return _integer(value[0], 0, MAX_PAGES, "the page count"), _expect_bool(value[1], "repaired"), value[2]
    if operation == "page_info":
        _expect(isinstance(value, dict) and set(value) == {"width", "height", "pixels", "dpi"}, "not a page's info")
        pixels, dpi = value["pixels"], value["dpi"]
        return {
            "width": _number(value["width"], 0.0, 1e7, "the page's width"),
            "height": _number(value["height"], 0.0, 1e7, "the page's height"),
            "pixels": None if pixels is None else _integer(pixels, 0, MAX_PAGE_PIXELS, "the page's pixels"),
            "dpi": None if dpi is None else _number(dpi, 1.0, MAX_DPI, "the page's resolution"),
        }
    if operation in ("text_layer", "ocr"):
        _expect(isinstance(value, dict) and set(value) == {"text", "words", "boxes"}, "not a text layer")
        text = _string(value["text"], MAX_TEXT_CHARS, "the page's text")
        words, boxes = value["words"], value["boxes"]
        _expect(isinstance(words, list) and len(words) <= MAX_WORDS, f"over {MAX_WORDS} words")
        _expect(isinstance(boxes, list) and len(boxes) == 4 * len(words), "not four box corners a word")
        return (
            text,
            [_string(word, MAX_WORD_CHARS, "a word") for word in words],
            [_number(corner, -1.0, 2.0, "a box corner") for corner in boxes],
        )
    if operation == "render":
        _expect(isinstance(value, list) and len(value) == 3 and value[2] == 3, "render's answer is not [h, w, 3]")
        height, width = _integer(value[0], 1, 1 << 20, "the height"), _integer(value[1], 1, 1 << 20, "the width")
        _expect(height * width * 3 <= pixel_buffer_bytes, "the page does not fit the shared buffer")
        return height, width, 3
    _expect(operation == "close" and value is None, f"an answer to {operation} with a value")
    return None


def _expect_bool(value: Any, what: str) -> bool:
    _expect(isinstance(value, bool), f"{what} is not a boolean")
    return value
