"""BlockManager: exact block ids, ref counts, LRU order across share, fork (CoW), free."""

from __future__ import annotations

import pytest

from actors.scheduler.block_manager import Allocation, BlockManager
from actors.scheduler.prefix_hash import extend_block_keys, extra_keys


def keys_of(tokens, block_size=4, salt=None):
    return extend_block_keys([], tokens, block_size, extra_keys(salt), len(tokens))


def refs(bm):
    return [bm.ref_count(b) for b in range(bm.num_blocks)]


def test_allocation_and_free_order_without_caching():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    assert bm.allocate("a", 0, 10) == Allocation(0, [0, 1, 2], [])
    assert bm.allocate("b", 0, 4) == Allocation(0, [3], [])
    assert bm.allocate("a", 10, 1) == Allocation(3, [], [])  # position 10 is in block 2
    assert bm.allocate("a", 11, 2) == Allocation(3, [4], [])
    assert bm.block_table("a") == [0, 1, 2, 4]
    assert refs(bm) == [1, 1, 1, 1, 1, 0, 0, 0]
    assert bm.num_used_blocks == 5 and bm.usage == 5 / 8
    bm.free("a")  # NOTE: tail first
    assert bm.free_block_ids() == [5, 6, 7, 4, 2, 1, 0]
    assert bm.evictable_block_ids() == []
    assert bm.allocate("c", 0, 16) == Allocation(0, [5, 6, 7, 4], [])
    assert bm.allocate("d", 0, 17) is None  # needs 5, 3 free: nothing changes
    assert not bm.has_blocks("d") and bm.free_block_ids() == [2, 1, 0]
    bm.free("b")
    bm.free("c")
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 8
    bm.check_invariants()


def test_prefix_hit_shares_blocks_and_freed_prefix_goes_to_lru():
    bm = BlockManager(8, 4)
    prompt = list(range(1, 11))  # 10 tokens: 2 full blocks
    keys = keys_of(prompt)
    assert bm.find_cached_prefix(keys, 10) == []
    assert bm.allocate("a", 0, 10) == Allocation(0, [0, 1, 2], [])
    assert bm.find_cached_prefix(keys, 10) == []  # not computed yet: nothing registered
    bm.cache_full_blocks("a", keys, 2)
    assert bm.block_key(0) == keys[0] and bm.block_key(1) == keys[1]
    assert bm.block_key(2) is None
    hits = bm.find_cached_prefix(keys, 10)
    assert hits == [0, 1]
    assert bm.allocate("b", 8, 2, hits) == Allocation(2, [3], [])
    assert bm.block_table("b") == [0, 1, 3]
    assert refs(bm)[:4] == [2, 2, 1, 1]
    bm.free("a")
    assert refs(bm)[:4] == [1, 1, 0, 1] and bm.free_block_ids() == [4, 5, 6, 7, 2]
    bm.free("b")
    assert bm.evictable_block_ids() == [1, 0]  # b's tail block first
    assert bm.free_block_ids() == [4, 5, 6, 7, 2, 3]
    assert bm.usage == 0.0 and bm.num_cached_blocks == 2
    # A third request with the same prompt revives both from the LRU list.
    hits = bm.find_cached_prefix(keys, 10)
    assert hits == [0, 1]
    assert bm.allocate("c", 8, 2, hits) == Allocation(2, [4], [])
    assert bm.evictable_block_ids() == [] and refs(bm)[:5] == [1, 1, 0, 0, 1]
    bm.check_invariants()


def test_fully_cached_prompt_recomputes_its_last_block():
    bm = BlockManager(8, 4)
    prompt = list(range(1, 9))  # exactly 2 full blocks
    keys = keys_of(prompt)
    bm.allocate("a", 0, 8)
    bm.cache_full_blocks("a", keys, 2)
    assert bm.find_cached_prefix(keys, 8) == [0]  # at least one token left to compute
    assert bm.find_cached_prefix(keys, 9) == [0, 1]
    assert bm.allocate("b", 4, 4, [0]) == Allocation(1, [2], [])


def test_lru_eviction_order():
    bm = BlockManager(4, 2)
    ka, kb = keys_of([1, 2, 3, 4], 2), keys_of([5, 6, 7, 8], 2)
    assert bm.allocate("a", 0, 4) == Allocation(0, [0, 1], [])
    assert bm.allocate("b", 0, 4) == Allocation(0, [2, 3], [])
    bm.cache_full_blocks("a", ka, 2)
    bm.cache_full_blocks("b", kb, 2)
    bm.free("a")
    bm.free("b")
    assert bm.free_block_ids() == [] and bm.evictable_block_ids() == [1, 0, 3, 2]
    assert bm.allocate("c", 0, 2) == Allocation(0, [1], [])  # evicts the LRU head
    assert bm.block_key(1) is None and bm.num_cached_blocks == 3
    assert bm.find_cached_prefix(ka, 5) == [0]  # block 1 was evicted
    # A hit takes block 0 out of the LRU list; freed again, it goes to the tail.
    assert bm.allocate("d", 2, 1, [0]) == Allocation(1, [3], [])
    assert bm.evictable_block_ids() == [2]
    bm.free("d")
    assert bm.evictable_block_ids() == [2, 0] and bm.free_block_ids() == [3]
    assert bm.allocate("e", 0, 6) == Allocation(0, [3, 2, 0], [])  # free list, then LRU
    assert bm.num_cached_blocks == 0
    bm.check_invariants()


def test_fork_and_copy_on_write_of_a_partial_last_block():
    bm = BlockManager(8, 4)
    assert bm.allocate("p", 0, 6) == Allocation(0, [0, 1], [])
    bm.cache_full_blocks("p", keys_of(list(range(6))), 1)
    assert bm.fork("p", "c1") == [0, 1]
    assert bm.fork("p", "c2") == [0, 1]
    assert refs(bm)[:2] == [3, 3]
    # c1 recomputes the last prompt token (position 5, block 1 shared): copy on write.
    assert bm.allocate("c1", 5, 1) == Allocation(1, [2], [(1, 2)])
    assert refs(bm)[:3] == [3, 2, 1]
    # The parent's first decode writes position 6 into shared block 1: copy too.
    assert bm.allocate("p", 6, 1) == Allocation(1, [3], [(1, 3)])
    # The last holder of block 1 writes in place.
    assert bm.allocate("c2", 5, 1) == Allocation(2, [], [])
    assert [bm.block_table(s) for s in ("p", "c1", "c2")] == [[0, 3], [0, 2], [0, 1]]
    assert refs(bm)[:4] == [3, 1, 1, 1]
    for seq in ("c1", "p", "c2"):
        bm.free(seq)
    assert bm.evictable_block_ids() == [0]
    assert bm.free_block_ids() == [4, 5, 6, 7, 2, 3, 1]
    bm.check_invariants()


def test_fork_of_a_full_last_block_copies_for_the_child_only():
    bm = BlockManager(8, 4)
    bm.allocate("p", 0, 8)
    bm.cache_full_blocks("p", keys_of(list(range(8))), 2)
    bm.fork("p", "c")
    assert bm.allocate("c", 7, 1) == Allocation(1, [2], [(1, 2)])
    assert bm.allocate("p", 8, 1) == Allocation(2, [3], [])
    assert bm.block_table("c") == [0, 2] and bm.block_table("p") == [0, 1, 3]
    bm.cache_full_blocks("c", keys_of(list(range(8))), 2)
    assert bm.block_key(2) is None  # a duplicate of block 1's key: not registered
    assert refs(bm)[:4] == [2, 1, 1, 1]
    bm.check_invariants()


def test_cow_waits_for_free_blocks():
    bm = BlockManager(2, 4)
    bm.allocate("p", 0, 6)
    bm.fork("p", "c")
    assert bm.allocate("c", 5, 1) is None
    assert bm.block_table("c") == [0, 1] and refs(bm) == [2, 2]
    bm.free("p")
    assert bm.allocate("c", 5, 1) == Allocation(2, [], [])


def test_usage_counts_live_blocks_only_and_reset_drops_cached_blocks():
    bm = BlockManager(4, 4)
    keys = keys_of(list(range(8)))
    bm.allocate("a", 0, 8)
    bm.cache_full_blocks("a", keys, 2)
    bm.allocate("b", 0, 8)
    bm.cache_full_blocks("b", keys_of(list(range(10, 18))), 2)
    bm.free("a")
    assert bm.usage == 0.5 and bm.num_used_blocks == 2 and bm.evictable_block_ids() == [1, 0]
    assert bm.reset_prefix_cache() == 2
    assert bm.free_block_ids() == [1, 0] and bm.evictable_block_ids() == []
    assert bm.num_cached_blocks == 0 and bm.block_key(2) is None  # in use, no longer shared
    assert bm.find_cached_prefix(keys, 9) == []
    bm.free("b")
    assert bm.free_block_ids() == [1, 0, 3, 2] and bm.usage == 0.0
    bm.check_invariants()


def test_salts_separate_keys():
    tokens = list(range(8))
    assert keys_of(tokens, salt="A") != keys_of(tokens, salt="B")
    assert keys_of(tokens, salt="A") == keys_of(tokens, salt="A")
    assert keys_of(tokens) != keys_of(tokens, salt="")
    assert len(keys_of(tokens)[0]) == 32
    bm = BlockManager(4, 4)
    bm.allocate("a", 0, 8)
    bm.cache_full_blocks("a", keys_of(tokens, salt="A"), 2)
    assert bm.find_cached_prefix(keys_of(tokens, salt="B") + [b""], 9) == []
    assert bm.find_cached_prefix(keys_of(tokens, salt="A") + [b""], 9) == [0, 1]


def test_invalid_geometry():
    with pytest.raises(ValueError):
        BlockManager(0, 16)


def test_truncate_returns_the_tail_blocks():
    bm = BlockManager(8, 4)
    bm.allocate("a", 0, 14)  # 4 blocks
    table = bm.block_table("a")
    bm.truncate("a", 9)  # 3 blocks hold 9 tokens
    assert bm.block_table("a") == table[:3] and bm.num_used_blocks == 3
    bm.truncate("a", 12)  # nothing beyond
    assert bm.block_table("a") == table[:3]
    bm.check_invariants()
