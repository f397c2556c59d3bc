"""Where a JSON object or array ends in a text, without parsing it (for streamed output)."""

from __future__ import annotations

_CLOSE = {"{": "}", "[": "]"}


def json_value_end(text: str, start: int = 0) -> int | None:
    """Index just past the object/array opening at text[start] (or past the first bracket
    that does not match: the caller's parse then fails), None while the text ends first.
    Strings (with escapes) are skipped, not parsed."""
    if start >= len(text) or text[start] not in _CLOSE:
        return None
    expected = []
    in_string = escaped = False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in _CLOSE:
            expected.append(_CLOSE[ch])
        elif ch in "}]":
            if expected.pop() != ch or not expected:
                return i + 1
    return None


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that `marker` starts with (a marker in the
    making), shorter than the marker itself."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
