"""Read a TOC's JSON one entry at a time (sans-I/O).

``json.loads`` of a whole TOC builds every entry as a dict before the index builder sees
the first one: for a 200 000-entry TOC that is several hundred MB of short-lived objects,
about 6x the JSON text.  :func:`scan_toc` walks the top-level object itself and decodes
each element of ``"entries"`` with the standard library's JSON scanner, handing it to a
callback and dropping it, so the peak is the text plus one entry plus what the callback
keeps.  It accepts exactly the JSON that ``json.loads`` accepts for a top-level object
(any key order, other keys kept), and refuses a second ``"entries"`` key, which no
producer writes and which would otherwise be read twice.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from alsd.errors import FormatError

_WS = re.compile(r"[ \t\n\r]*")
# The standard library's scanner (C-accelerated): one JSON value at a given position.
_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _ws(text: str, pos: int) -> int:
    """The position after the JSON whitespace at ``pos``."""
    m = _WS.match(text, pos)
    assert m is not None  # the pattern matches the empty string
    return m.end()


def decode_text(raw: bytes) -> str:
    """The TOC's bytes as text, with the encodings ``json.loads`` accepts for bytes."""
    try:
        return raw.decode(json.detect_encoding(raw), "surrogatepass")
    except (UnicodeDecodeError, LookupError) as exc:
        raise FormatError(f"TOC is not valid JSON: {exc}") from exc


def scan_toc(
    text: str,
    on_entry: Callable[[Any], None],
    on_member: Callable[[str, Any], None] | None = None,
) -> dict[str, Any]:
    """Call ``on_entry`` for each element of the top-level ``"entries"`` array, in order,
    and return the other top-level members (``"entries"`` maps to None when it was an
    array, else to its value).  ``on_member(key, value)`` is called for each other member
    as soon as it is read.  FormatError for anything that is not a JSON object.

    The callbacks may raise to stop the scan (their exceptions propagate unchanged).
    """
    scan = _scan
    out: dict[str, Any] = {}
    pos = _ws(text, 0)
    try:
        if text[pos : pos + 1] != "{":
            raise FormatError("TOC is not a JSON object")
        pos = _ws(text, pos + 1)
        if text[pos : pos + 1] == "}":
            pos += 1
        else:
            while True:
                if text[pos : pos + 1] != '"':
                    raise _error("expected a member name", text, pos)
                key, pos = scan(text, pos)
                pos = _ws(text, pos)
                if text[pos : pos + 1] != ":":
                    raise _error("expected ':'", text, pos)
                pos = _ws(text, pos + 1)
                if key == "entries":
                    if key in out:
                        raise FormatError("TOC has more than one 'entries' member")
                    if text[pos : pos + 1] == "[":
                        pos = _scan_array(text, pos + 1, on_entry)
                        out[key] = None
                    else:
                        out[key], pos = scan(text, pos)
                else:
                    out[key], pos = scan(text, pos)
                    if on_member is not None:
                        on_member(key, out[key])
                pos = _ws(text, pos)
                sep = text[pos : pos + 1]
                pos = _ws(text, pos + 1)
                if sep == "}":
                    break
                if sep != ",":
                    raise _error("expected ',' or '}'", text, pos - 1)
    except StopIteration as exc:
        raise _error("unexpected value", text, exc.value) from None
    except json.JSONDecodeError as exc:
        raise FormatError(f"TOC is not valid JSON: {exc}") from None
    if _ws(text, pos) != len(text):
        raise _error("extra data after the object", text, pos)
    return out


def _scan_array(text: str, pos: int, on_entry: Callable[[Any], None]) -> int:
    scan = _scan
    pos = _ws(text, pos)
    if text[pos : pos + 1] == "]":
        return pos + 1
    while True:
        value, pos = scan(text, pos)
        on_entry(value)
        del value
        pos = _ws(text, pos)
        sep = text[pos : pos + 1]
        pos = _ws(text, pos + 1)
        if sep == "]":
            return pos
        if sep != ",":
            raise _error("expected ',' or ']'", text, pos - 1)


def _error(what: str, text: str, pos: int) -> FormatError:
    line = text.count("\n", 0, pos) + 1
    return FormatError(f"TOC is not valid JSON: {what} at line {line} (char {pos})")
