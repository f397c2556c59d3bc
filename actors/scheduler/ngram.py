"""N-gram (prompt lookup) proposals: the tokens that followed the latest earlier occurrence
of the sequence's own suffix.

For n from `max_n` down to `min_n`, the last n tokens are looked up in the history before
them; the first n that matches proposes up to `k` of the tokens after the match (the most
recent match wins: quoted text and code repeat what was just read). No match: nothing.
NOTE: the lookup scans at most the last SEARCH_WINDOW tokens (a Python scan per running
sequence and step: a long context must not stall the scheduler's loop).
"""

from __future__ import annotations

SEARCH_WINDOW = 2048


def propose_ngram(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    size = len(tokens)
    if k <= 0:
        return []
    floor = max(0, size - SEARCH_WINDOW)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        suffix = tokens[size - n :]
        last = suffix[-1]
        # NOTE: scan back for the suffix's last token first; compare the n-gram only there
        i = size - 2
        while i >= floor + n - 1:
            if tokens[i] == last and tokens[i - n + 1 : i + 1] == suffix:
                return tokens[i + 1 : i + 1 + k]
            i -= 1
    return []
