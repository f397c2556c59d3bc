"""The few GGUF header fields a start-up check needs, read without the `gguf` package
(which parses every tensor's info first: seconds for a small model).

Layout (GGUF v2/v3, little-endian): magic `GGUF`, uint32 version, uint64 tensor count,
uint64 metadata count, then metadata pairs: a string key (uint64 length + UTF-8), a uint32
value type, the value. Strings are a uint64 length + bytes; arrays a uint32 element type, a
uint64 count, then the elements.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

_STRING, _ARRAY = 8, 9
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
MAX_KEYS_SCANNED = 64  # general.* keys come first; the tokenizer's huge arrays later


class GGUFHeaderError(ValueError):
    pass


def _read(f: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise GGUFHeaderError("the GGUF header is truncated")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> bytes:
    return f.read(_read(f, "<Q"))


def _skip(f: BinaryIO, value_type: int) -> None:
    if value_type == _STRING:
        f.seek(_read(f, "<Q"), 1)
    elif value_type == _ARRAY:
        element_type, count = _read(f, "<I"), _read(f, "<Q")
        if element_type in _SCALAR_SIZES:
            f.seek(_SCALAR_SIZES[element_type] * count, 1)
        else:
            for _ in range(count):
                _skip(f, element_type)
    elif value_type in _SCALAR_SIZES:
        f.seek(_SCALAR_SIZES[value_type], 1)
    else:
        raise GGUFHeaderError(f"unknown GGUF metadata type {value_type}")


def gguf_string_field(path: str | Path, key: str) -> str | None:
    """The string metadata `key` (e.g. "general.architecture"), or None if absent among the
    first MAX_KEYS_SCANNED pairs."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFHeaderError("not a GGUF file")
        _read(f, "<I")  # version
        _read(f, "<Q")  # tensor count
        count = _read(f, "<Q")
        for _ in range(min(count, MAX_KEYS_SCANNED)):
            name, value_type = _string(f), _read(f, "<I")
            if name.decode("utf-8", "replace") == key and value_type == _STRING:
                return _string(f).decode("utf-8", "replace")
            _skip(f, value_type)
    return None
