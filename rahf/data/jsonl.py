"""JSON Lines from untrusted files, read so that one bad line is a reported line, never an exception or a huge
allocation: the reader of `rahf data consolidate` annotations and of a Pick-a-Pic folder's `prompts.jsonl`.

Each non-blank line becomes its JSON value or a `JSONLineError` whose `message` says what is wrong with it:

- a line longer than `max_line_chars` (default `DEFAULT_MAX_LINE_CHARS`, 1,000,000 characters) is refused unread
  (memory holds at most that much of it);
- bytes that are not UTF-8 (a UTF-8 byte order mark at the start of the file is allowed);
- text that is not JSON, including the `NaN`, `Infinity` and `-Infinity` literals Python's `json` accepts;
- a number that does not fit a double (`1e400`), or an integer literal of more digits than Python converts (4,300 by
  default, `sys.get_int_max_str_digits()`);
- JSON nested beyond what the parser's recursion allows (`[[[[...`).

Lines are numbered from 1 as a text editor does (`\\n`, `\\r\\n` and `\\r` end a line); blank lines are skipped but
counted.

Examples:
    >>> from rahf.data.jsonl import JSONLineError, read_jsonl
    >>> for line_no, value in read_jsonl("annotations.jsonl"):
    ...     if isinstance(value, JSONLineError):
    ...         print(line_no, value.message)
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "DEFAULT_MAX_LINE_CHARS",
    "JSONLineError",
    "iter_jsonl",
    "parse_json_line",
    "read_jsonl",
]

# An annotation line is a few hundred characters; a million is room for thousands of points.
DEFAULT_MAX_LINE_CHARS = 1_000_000


@dataclass(frozen=True)
class JSONLineError:
    """A line that is not a usable JSON value; `message` is the reason, ready for a report."""

    message: str


class _RefusedNumber(ValueError):
    """A number literal that `json` would turn into inf or nan."""


def _parse_constant(name: str) -> Any:
    raise _RefusedNumber(f"the literal {name} is not JSON: numbers must be finite")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _RefusedNumber(
            f"the number {text[:40]}{'...' if len(text) > 40 else ''} is beyond the range of a double"
        )
    return value


def parse_json_line(line: str | bytes) -> Any:
    """The JSON value of one line; raises `ValueError` with the reason (as in `JSONLineError.message`) otherwise."""
    if isinstance(line, (bytes, bytearray)):
        try:
            line = bytes(line).decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"not valid UTF-8: {err}") from None
    if not line.isascii():
        # Undecodable bytes come through `surrogateescape` as lone surrogates (a JSON `\ud800` escape is six ASCII
        # characters), which UTF-8 cannot encode: that finds them at C speed.
        try:
            line.encode("utf-8")
        except UnicodeEncodeError as err:
            code = ord(line[err.start])
            what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"the lone surrogate U+{code:04X}"
            raise ValueError(f"not valid UTF-8: {what} at character {err.start + 1}") from None
    try:
        return json.loads(line, parse_constant=_parse_constant, parse_float=_parse_float)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON: {err}") from None
    except _RefusedNumber as err:
        raise ValueError(f"number refused: {err}") from None
    except ValueError as err:  # Python's limit on the digits of an int conversion
        detail = str(err).split(";")[0]
        raise ValueError(f"number refused: an integer literal too long to convert ({detail})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply for the parser (an annotation line needs 3 levels)") from None


def iter_jsonl(stream: BinaryIO, *, max_line_chars: int = DEFAULT_MAX_LINE_CHARS) -> Iterator[tuple[int, Any]]:
    """(line number, JSON value or `JSONLineError`) for each non-blank line of a binary stream (left open)."""
    if isinstance(max_line_chars, bool) or not isinstance(max_line_chars, int) or max_line_chars < 1:
        raise ValueError(f"`max_line_chars` must be a positive character count, got {max_line_chars!r}")
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline=None)
    try:
        line_no = 0
        while line := text.readline(max_line_chars + 1):
            line_no += 1
            if len(line) > max_line_chars and not line.endswith("\n"):
                # The rest is skipped a piece at a time: memory never holds more than `max_line_chars` of it.
                length = len(line)
                while not line.endswith("\n") and (line := text.readline(max_line_chars + 1)):
                    length += len(line.rstrip("\n"))
                message = (
                    f"line of {length:,} characters, more than the {max_line_chars:,} accepted (max_line_chars): a "
                    "damaged file, or a record to split"
                )
                yield line_no, JSONLineError(message)
                continue
            if not line.strip():
                continue
            try:
                yield line_no, parse_json_line(line)
            except ValueError as err:
                yield line_no, JSONLineError(str(err))
    finally:
        text.detach()  # the caller's stream stays open


def read_jsonl(path: str | Path, *, max_line_chars: int = DEFAULT_MAX_LINE_CHARS) -> Iterator[tuple[int, Any]]:
    """(line number, JSON value or `JSONLineError`) for each non-blank line of the file at `path`."""
    with open(path, "rb") as f:
        yield from iter_jsonl(f, max_line_chars=max_line_chars)
