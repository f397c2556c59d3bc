"""Content keys of full KV blocks for automatic prefix caching.

A full block's key is SHA-256 over (parent block's key, extra keys, the block's token ids),
so equal keys mean equal token prefixes under equal extra keys (LoRA name, cache_salt).
NOTE: never Python's `hash()`: it is salted per process and collides by design.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

ROOT_KEY = bytes(32)  # the parent key of a sequence's first block


def extra_keys(cache_salt: str | None = None, lora_name: str | None = None) -> bytes:
    """The per-request bytes mixed into every block key (empty when neither is set)."""
    if cache_salt is None and lora_name is None:
        return b""
    parts = []
    for tag, value in ((b"L", lora_name), (b"S", cache_salt)):
        if value is not None:
            raw = value.encode()
            parts.append(tag + struct.pack("<I", len(raw)) + raw)
    return b"".join(parts)


def block_key(parent: bytes, token_ids: Sequence[int], extra: bytes = b"") -> bytes:
    """SHA-256 of one full block: 32-byte parent key, length-prefixed extras, uint32 tokens."""
    h = hashlib.sha256(parent)
    h.update(struct.pack("<I", len(extra)))
    h.update(extra)
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return h.digest()


def extend_block_keys(
    keys: list[bytes], token_ids: Sequence[int], block_size: int, extra: bytes, num_blocks: int
) -> list[bytes]:
    """Append keys to `keys` (in place) until it covers `num_blocks` full blocks of tokens."""
    num_blocks = min(num_blocks, len(token_ids) // block_size)
    parent = keys[-1] if keys else ROOT_KEY
    for i in range(len(keys), num_blocks):
        parent = block_key(parent, token_ids[i * block_size : (i + 1) * block_size], extra)
        keys.append(parent)
    return keys
