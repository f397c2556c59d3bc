"""The scheduler's use of prefix caching: lookups, registration of filled blocks, hit counts.

The block manager owns the cached blocks (hashes, LRU, reference counts); this keeps what
the scheduling policy asks of it in one place, and the counters the stats report.
"""

from __future__ import annotations

from actors.scheduler.block_manager import BlockManager
from actors.scheduler.sequence import Sequence


class PrefixCache:
    def __init__(self, blocks: BlockManager, block_size: int) -> None:
        self.blocks = blocks
        self.block_size = block_size
        self.enabled = blocks.enable_prefix_caching
        self.queries = 0  # prompt tokens looked up (once per request)
        self.hits = 0  # of those, found cached

    def lookup(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix of `seq`'s tokens."""
        if not self.enabled:
            return []
        keys = seq.full_block_keys(self.block_size, seq.num_tokens // self.block_size)
        return self.blocks.find_cached_prefix(keys, seq.num_tokens)

    def count_query(self, seq: Sequence, hit_tokens: int) -> None:
        """Count a request's first lookup (not its recomputes after preemption)."""
        request = seq.request
        if request.counted or not self.enabled:
            return
        request.counted = True
        request.num_cached_tokens = hit_tokens
        self.queries += seq.num_tokens
        self.hits += hit_tokens

    def register_computed(self, seq: Sequence, num_new: int) -> None:
        """Register the blocks a step filled (full and computed)."""
        num_full = seq.num_computed // self.block_size
        if not self.enabled or num_full == (seq.num_computed - num_new) // self.block_size:
            return
        keys = seq.full_block_keys(self.block_size, num_full)
        self.blocks.cache_full_blocks(seq.seq_id, keys, num_full)
