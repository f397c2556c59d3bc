"""The in-memory store of responses created with `store: true`, one namespace per API key.

Bounded two ways (`--responses-store-max-entries`, `--responses-store-max-bytes`): past
either bound the least recently used responses are evicted. A record's size is the length
of its JSON (the response and its conversation's items). NOTE: the owner is a SHA-256 of
the request's Authorization header, so one key can never name another key's responses, and
nothing in the store keeps a key itself.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import msgspec

DEFAULT_MAX_ENTRIES = 1024
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class StoredResponse:
    """A response body and its whole conversation as Responses items (input, then output),
    which a request naming it as `previous_response_id` continues."""

    body: dict[str, Any]
    items: list[dict[str, Any]]
    size: int


def owner_of(authorization: str | None) -> str:
    return hashlib.sha256((authorization or "").encode()).hexdigest()


class ResponseStore:
    """LRU by count and by bytes; `get` refreshes an entry."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple[str, str], StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, owner: str, body: dict[str, Any], items: list[dict[str, Any]]) -> bool:
        """Keep the response; False when it alone exceeds the byte bound (not kept)."""
        size = len(msgspec.json.encode(body)) + len(msgspec.json.encode(items))
        if size > self.max_bytes or self.max_entries < 1:
            return False
        self.delete(owner, body["id"])
        self._entries[(owner, body["id"])] = StoredResponse(body, items, size)
        self.bytes += size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.size
        return True

    def get(self, owner: str, response_id: str) -> StoredResponse | None:
        record = self._entries.get((owner, response_id))
        if record is not None:
            self._entries.move_to_end((owner, response_id))
        return record

    def delete(self, owner: str, response_id: str) -> bool:
        record = self._entries.pop((owner, response_id), None)
        if record is None:
            return False
        self.bytes -= record.size
        return True
