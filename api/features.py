"""The `feature` label of cost attribution: from the `X-Feature` header (the shipped nginx
site sets it per API key, overwriting a client's) or else the request's `metadata.feature`.

Label values are checked and bounded so that no client can explode the series count: at most
64 characters of `[A-Za-z0-9_.:-]` (else "invalid"), at most `max_tags` distinct values
(beyond them "other"); absent is "none".
"""

from __future__ import annotations

import re

NONE, INVALID, OTHER = "none", "invalid", "other"
_VALID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class FeatureTags:
    """Turns a request's header or metadata into a bounded label (one per server)."""

    def __init__(self, max_tags: int = 64) -> None:
        self.max_tags = max_tags
        self.seen: set[str] = set()

    def label(self, header: str | None, metadata: dict[str, str] | None) -> str:
        raw = header if header else (metadata or {}).get("feature")
        if not raw:
            return NONE
        if not isinstance(raw, str) or not _VALID.fullmatch(raw):
            return INVALID
        if raw in self.seen or raw in (NONE, INVALID, OTHER):
            return raw
        if len(self.seen) >= self.max_tags:
            return OTHER
        self.seen.add(raw)
        return raw
