"""Incremental reader for files holding one JSON array (Recipe1M's ``layer*.json``).

``layer1.json`` is about 1.4 GB; ``json.load`` would hold the whole text plus every decoded
recipe in memory. :func:`iter_json_array` reads the file in character chunks and decodes one
array element at a time with :meth:`json.JSONDecoder.raw_decode`, so memory stays at a chunk
plus one element. Malformed input raises :class:`JSONFormatError` naming the file, line, column
and character offset.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jointgen.utils.checks import DataFormatError

_WS = re.compile(r"[ \t\n\r]*")
# the longest single element accepted before the input is declared malformed
MAX_ELEMENT_CHARS = 1 << 28
# decode errors this close to the buffer end may come from the cut (longest: a \uXXXX escape)
_TAIL = 16


class JSONFormatError(DataFormatError):
    """Malformed JSON; the message names the file, line, column and character offset.

    A :class:`DataFormatError` (a ``ConfigError``) so that the console scripts print it as one
    line.
    """

    def __init__(self, path: str | Path, msg: str, offset: int, line: int, column: int) -> None:
        super().__init__(
            f"{path}: malformed JSON at line {line} column {column} (char {offset}): {msg}"
        )
        self.path, self.offset, self.line, self.column = str(path), offset, line, column


class _Chunks:
    """A text buffer over a binary file that remembers how many characters and lines it dropped.

    The bytes are decoded here (not by a text-mode file) so that invalid UTF-8 is reported with
    its position like any other malformed input.
    """

    def __init__(self, f: Any, chunk_size: int, path: Path) -> None:
        self.f, self.chunk_size, self.path = f, chunk_size, path
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.bytes_read, self.started = 0, False
        self.buf, self.pos = "", 0
        self.dropped_chars, self.dropped_lines = 0, 0
        self.dropped_line_start = 0  # absolute offset where the last dropped line began
        self.eof = False

    def more(self) -> bool:
        """Append the next chunk (first dropping what was consumed); False at end of file."""
        if self.eof:
            return False
        head = self.buf[: self.pos]
        newlines = head.count("\n")
        if newlines:
            self.dropped_lines += newlines
            self.dropped_line_start = self.dropped_chars + head.rfind("\n") + 1
        self.dropped_chars += len(head)
        self.buf, self.pos = self.buf[self.pos :], 0
        raw = self.f.read(self.chunk_size)
        chunk = self._decode(raw)
        if not self.started and chunk:
            self.started = True
            if chunk.startswith("\ufeff"):  # tolerate a byte-order mark
                chunk = chunk[1:]
        self.bytes_read += len(raw)
        self.buf += chunk
        if not raw:
            self.eof = True
        return bool(raw)

    def _decode(self, raw: bytes) -> str:
        pending = self.decoder.getstate()[0]  # bytes of a character cut by the last chunk
        try:
            return self.decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            # e.start indexes pending + raw; decode the valid part to locate the error
            data = pending + raw
            self.buf += data[: e.start].decode("utf-8", errors="replace")
            byte = self.bytes_read - len(pending) + e.start
            msg = f"invalid UTF-8 (byte 0x{data[e.start]:02x} at byte offset {byte})"
            raise self.error(self.path, msg, len(self.buf)) from None

    def skip_ws(self) -> str:
        """Skip whitespace, reading on as needed; the next character or '' at end of file."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def error(self, path: Path, msg: str, pos: int) -> JSONFormatError:
        line = self.dropped_lines + self.buf.count("\n", 0, pos) + 1
        offset = self.dropped_chars + pos
        newline = self.buf.rfind("\n", 0, pos)
        line_start = self.dropped_chars + newline + 1 if newline >= 0 else self.dropped_line_start
        return JSONFormatError(path, msg, offset, line, offset - line_start + 1)


def iter_json_array(path: str | Path, chunk_size: int = 1 << 20) -> Iterator[Any]:
    """Yield the elements of the JSON array stored in ``path``, one at a time.

    Args:
        path: UTF-8 file whose whole content is one JSON array.
        chunk_size: Characters read per refill (memory is about a chunk plus one element).

    Raises:
        FileNotFoundError: the file does not exist.
        JSONFormatError: the text is not a JSON array (names line, column and offset).
    """
    path = Path(path)
    decoder = json.JSONDecoder()
    with open(path, "rb") as f:
        s = _Chunks(f, chunk_size, path)
        if s.skip_ws() != "[":
            raise s.error(path, "expected '[' (the file must hold one JSON array)", s.pos)
        s.pos += 1
        first = True
        while True:
            c = s.skip_ws()
            if c == "]":
                s.pos += 1
                break
            if not first:
                if c != ",":
                    what = "end of file" if c == "" else repr(c)
                    raise s.error(path, f"expected ',' or ']' but found {what}", s.pos)
                s.pos += 1
                c = s.skip_ws()
            if c == "":
                raise s.error(path, "unexpected end of file inside the array", s.pos)
            yield _decode_one(decoder, s, path)
            first = False
        if s.skip_ws() != "":
            raise s.error(path, "extra data after the closing ']'", s.pos)


def _decode_one(decoder: json.JSONDecoder, s: _Chunks, path: Path) -> Any:
    """Decode the element at ``s.pos``, reading more text while it may be cut by the buffer."""
    while True:
        try:
            value, end = decoder.raw_decode(s.buf, s.pos)
        except json.JSONDecodeError as e:
            # an error well before the buffer end is real; near the end (a cut escape, literal
            # or number) or in a still-open string it may only mean the element goes on
            cut = e.pos + _TAIL >= len(s.buf) or e.msg.startswith("Unterminated string")
            if s.eof or not cut or len(s.buf) - s.pos > MAX_ELEMENT_CHARS:
                raise s.error(path, e.msg, e.pos) from None
            s.more()
            continue
        # a number or literal that touches the buffer end may continue in the next chunk
        if end + _TAIL >= len(s.buf) and not s.eof and not isinstance(value, (dict, list, str)):
            s.more()
            continue
        s.pos = end
        return value
