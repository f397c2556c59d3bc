"""Paged KV-cache blocks: free list, reference counts, block tables, prefix cache, CoW.

Every block is in exactly one of three states:
- free: on the free list (FIFO: allocation pops the head, freeing appends at the tail);
- evictable: ref count 0 but holding a registered full-block key, on the LRU list (oldest
  first); a prefix hit revives it, allocation evicts the oldest when the free list is empty;
- in use: ref count > 0, i.e. held by that many block tables.
A block's key is registered once it is full and computed (`cache_full_blocks`); only the
first block computed with a given key is registered, later duplicates stay unkeyed.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import NamedTuple


class Allocation(NamedTuple):
    """A sequence's block-table change for one step, as the runner applies it.

    The runner cuts its table at `block_table_start` and appends `block_ids`; `copies` are
    (src, dst) block copies (copy-on-write) to run before the forward.
    """

    block_table_start: int
    block_ids: list[int]
    copies: list[tuple[int, int]]


class BlockManager:
    """Owns the KV blocks and every sequence's block table (keyed by seq id)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._key: list[bytes | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[bytes, int] = {}
        self._tables: dict[str, list[int]] = {}
        self._num_keyed: dict[str, int] = {}  # leading table entries already offered to the cache
        self._num_used = 0

    # --- queries ---------------------------------------------------------------------

    def block_table(self, seq_id: str) -> list[int]:
        """A copy of the sequence's block table ([] when it holds none)."""
        return list(self._tables.get(seq_id, ()))

    def has_blocks(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def seq_ids(self) -> set[str]:
        """Ids of the sequences holding a block table."""
        return set(self._tables)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def block_key(self, block_id: int) -> bytes | None:
        return self._key[block_id]

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: free plus evictable (cached, unused)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by at least one block table."""
        return self._num_used

    @property
    def num_cached_blocks(self) -> int:
        """Blocks with a registered key, in use or evictable."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences; evictable cached blocks count as free."""
        return self._num_used / self.num_blocks

    def free_block_ids(self) -> list[int]:
        """The free list, next to be allocated first."""
        return list(self._free)

    def evictable_block_ids(self) -> list[int]:
        """The LRU list of cached unused blocks, next to be evicted first."""
        return list(self._evictable)

    # --- prefix cache ----------------------------------------------------------------

    def find_cached_prefix(self, block_keys: Sequence[bytes], num_tokens: int) -> list[int]:
        """Block ids of the leading full blocks whose keys are cached (a prefix hit).

        Capped at (num_tokens - 1) // block_size blocks so that at least one token is left
        to compute (when the whole prompt is cached, the last block is recomputed).
        `block_keys` must cover that many blocks when they exist.
        """
        if not self.enable_prefix_caching:
            return []
        hits = []
        for key in block_keys[: (num_tokens - 1) // self.block_size]:
            block = self._cached.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def cache_full_blocks(self, seq_id: str, block_keys: Sequence[bytes], num_full: int) -> None:
        """Register the keys of the sequence's first `num_full` blocks (full and computed)."""
        if not self.enable_prefix_caching:
            return
        table = self._tables[seq_id]
        start = self._num_keyed[seq_id]
        for i in range(start, num_full):
            block, key = table[i], block_keys[i]
            if self._key[block] is None and key not in self._cached:
                self._key[block] = key
                self._cached[key] = block
        self._num_keyed[seq_id] = max(start, num_full)

    def reset_prefix_cache(self) -> int:
        """Forget every registered key; evictable blocks go back to the free list.

        Blocks in use stay with their sequences but are no longer shareable. Returns the
        number of evictable blocks released.
        """
        released = len(self._evictable)
        for block in self._evictable:
            self._free.append(block)
        self._evictable.clear()
        for block in self._cached.values():
            self._key[block] = None
        self._cached.clear()
        return released

    # --- allocation ------------------------------------------------------------------

    def allocate(
        self,
        seq_id: str,
        num_computed: int,
        num_new_tokens: int,
        cached_prefix: Sequence[int] = (),
    ) -> Allocation | None:
        """Make room for tokens [num_computed, num_computed + num_new_tokens) of a sequence.

        A sequence without a table starts from `cached_prefix` (a `find_cached_prefix`
        result; then num_computed == len(cached_prefix) * block_size). Shared blocks in the
        written range are copied on write. Returns None, changing nothing, when there are
        not enough free blocks.
        """
        table = self._tables.get(seq_id)
        bs = self.block_size
        end = num_computed + num_new_tokens
        if (
            table is not None
            and end <= len(table) * bs
            and (end - 1) // bs == num_computed // bs
            and self._ref[table[num_computed // bs]] == 1
        ):
            return Allocation(len(table), [], [])  # NOTE: fast path: a decode in its own block
        end_block = -(-end // bs)
        if table is None:
            assert num_computed == len(cached_prefix) * bs
            shared = []
            revived = sum(1 for b in cached_prefix if self._ref[b] == 0)
            num_new_blocks = max(0, end_block - len(cached_prefix))
        else:
            first = num_computed // bs
            written = range(first, min(end_block, len(table)))
            shared = [i for i in written if self._ref[table[i]] > 1]
            revived = 0
            num_new_blocks = max(0, end_block - len(table))
        if num_new_blocks + len(shared) + revived > self.num_free_blocks:
            return None
        if table is None:
            table = self._tables[seq_id] = []
            for block in cached_prefix:
                self._acquire(block)
                table.append(block)
            self._num_keyed[seq_id] = len(table)
        start = len(table)
        copies = []
        for i in shared:
            src, dst = table[i], self._take_block()
            self._ref[src] -= 1  # NOTE: was > 1, so it stays in use by its other holders
            table[i] = dst
            copies.append((src, dst))
            start = min(start, i)
        for _ in range(num_new_blocks):
            table.append(self._take_block())
        return Allocation(start, table[start:], copies)

    def fork(self, parent_id: str, child_id: str) -> list[int]:
        """Give `child_id` the parent's whole block table, sharing every block (ref + 1)."""
        assert child_id not in self._tables
        table = list(self._tables[parent_id])
        for block in table:
            self._ref[block] += 1
        self._tables[child_id] = table
        self._num_keyed[child_id] = self._num_keyed[parent_id]
        return list(table)

    def truncate(self, seq_id: str, num_tokens: int) -> None:
        """Keep only the blocks of the first `num_tokens` tokens (rejected speculative
        tokens' blocks go back); the runner cuts its table with the next chunk."""
        table = self._tables.get(seq_id)
        keep = -(-num_tokens // self.block_size)
        if table is None or len(table) <= keep:
            return
        for block in reversed(table[keep:]):
            self._release(block)
        del table[keep:]
        self._num_keyed[seq_id] = min(self._num_keyed[seq_id], keep)

    def free(self, seq_id: str) -> None:
        """Drop the sequence's table; blocks reaching ref 0 become evictable (keyed) or free.

        NOTE: released from the last block to the first, so a sequence's tail blocks are
        evicted before its head (the head is the likelier shared prefix).
        """
        table = self._tables.pop(seq_id, None)
        self._num_keyed.pop(seq_id, None)
        if table is None:
            return
        for block in reversed(table):
            self._release(block)

    def _release(self, block: int) -> None:
        self._ref[block] -= 1
        if self._ref[block] == 0:
            self._num_used -= 1
            if self._key[block] is not None:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def _acquire(self, block: int) -> None:
        if self._ref[block] == 0:
            del self._evictable[block]
            self._num_used += 1
        self._ref[block] += 1

    def _take_block(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._key[block]]
            self._key[block] = None
        self._ref[block] = 1
        self._num_used += 1
        return block

    # --- checks ----------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (tests, debugging)."""
        holders = [0] * self.num_blocks
        for table in self._tables.values():
            assert len(set(table)) == len(table), "a table holds a block twice"
            for block in table:
                holders[block] += 1
        assert holders == self._ref, "ref counts differ from the number of holding tables"
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "a block is twice on the free list"
        in_use = {b for b in range(self.num_blocks) if self._ref[b] > 0}
        assert not (free & in_use) and not (evictable & in_use), "a block free and in use"
        assert not (free & evictable), "a block both free and evictable"
        assert len(free) + len(evictable) + len(in_use) == self.num_blocks, "a block leaked"
        assert self._num_used == len(in_use)
        for key, block in self._cached.items():
            assert self._key[block] == key
        assert sum(k is not None for k in self._key) == len(self._cached)
        assert all(self._key[b] is not None for b in evictable)
        assert all(self._key[b] is None for b in free)
