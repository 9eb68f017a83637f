"""Block pool and KV-cache manager: plain Python bookkeeping, tested alone."""

from __future__ import annotations

import pytest

from ladle.engine import block_pool as bp
from ladle.engine.block_pool import BlockPool
from ladle.engine.kv_manager import KVCacheManager
from ladle.engine.request import Request
from ladle.sample.params import SamplingParams


def make_request(rid: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(rid, list(tokens), SamplingParams(), cache_salt=salt, max_total_tokens=10_000)


def test_allocate_release_and_reference_counts():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert pool.num_free == 1 and all(b.ref_count == 1 for b in a)
    pool.acquire(a[:1])
    pool.release(a)
    assert pool.num_free == 3 and a[0].ref_count == 1
    pool.release(a[:1])
    assert pool.num_free == 4
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(a[:1])
    with pytest.raises(RuntimeError, match="only 4 free"):
        pool.allocate(5)


def test_free_list_hands_out_least_recently_used_first():
    pool = BlockPool(3)
    x, y, z = pool.allocate(3)
    pool.release([y])
    pool.release([x])
    pool.release([z])
    assert [b.block_id for b in pool.allocate(3)] == [y.block_id, x.block_id, z.block_id]


def test_a_cached_block_survives_release_until_evicted():
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.cache(a, 123, (1, 2), None, ("m", None))
    pool.release([a])
    assert pool.lookup(123, (1, 2), None, ("m", None)) is a
    pool.allocate(1)  # the never-used block comes first in LRU order
    pool.allocate(1)  # now `a` is evicted
    assert pool.lookup(123, (1, 2), None, ("m", None)) is None
    assert pool.num_evictions == 1


def test_lookup_compares_tokens_extra_keys_and_parent_incarnation():
    pool = BlockPool(4)
    parent, child = pool.allocate(2)
    pool.cache(parent, 1, (1, 2), None, ("m", None))
    pool.cache(child, 2, (3, 4), parent, ("m", None))
    assert pool.lookup(1, (1, 2), None, ("m", "tenant")) is None  # another tenant's salt
    assert pool.lookup(1, (9, 9), None, ("m", None)) is None  # same hash, other tokens
    assert pool.lookup(2, (3, 4), parent, ("m", None)) is child
    # the parent is evicted and refilled (even with the same tokens): the cached child's parent
    # link names the old incarnation, so the chain is broken
    pool.release([parent, child])
    assert parent in pool.allocate(3) and child.is_cached
    pool.cache(parent, 1, (1, 2), None, ("m", None))
    assert pool.lookup(1, (1, 2), None, ("m", None)) is parent
    assert pool.lookup(2, (3, 4), parent, ("m", None)) is None


def test_hash_collisions_never_return_other_tokens(monkeypatch):
    """With every hash colliding, prefix matching stays exact (it only finds fewer hits)."""
    monkeypatch.setattr(bp, "chain_hash", lambda parent, tokens, extra: 42)
    import ladle.engine.kv_manager as km

    monkeypatch.setattr(km, "chain_hash", lambda parent, tokens, extra: 42)
    kv = KVCacheManager(num_blocks=16, block_size=4)
    first = make_request("a", list(range(9)))
    assert kv.allocate(first, 9)
    first.num_computed_tokens = 9
    kv.cache_computed_blocks(first)
    other = make_request("b", [100, 101, 102, 103, 4, 5, 6, 7, 8])
    assert kv.find_cached_prefix(other).num_tokens == 0
    same = make_request("c", list(range(9)))
    hit = kv.find_cached_prefix(same)
    assert hit.num_tokens == 4 and hit.blocks[0] is kv.tables["a"][0]  # the second block's hash was taken


def test_cached_prefix_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    r = make_request("a", list(range(8)))
    assert kv.allocate(r, 8)
    r.num_computed_tokens = 8
    kv.cache_computed_blocks(r)
    again = make_request("b", list(range(8)))
    hit = kv.find_cached_prefix(again)
    assert hit.num_tokens == 4  # not 8: the last token must run to produce logits
    assert kv.allocate(again, 4, hit)  # admission counts the lookup
    assert kv.stats.num_queried_blocks == 1 and kv.stats.num_hit_blocks == 1


def test_allocate_fails_without_side_effects_and_counts_reclaimed_hits():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = make_request("a", list(range(12)))
    assert kv.allocate(a, 12)
    a.num_computed_tokens = 12
    kv.cache_computed_blocks(a)
    kv.free(a)  # 3 cached blocks in the free list, 4 free in all
    b = make_request("b", list(range(8)) + [50] * 12)
    hit = kv.find_cached_prefix(b)
    assert hit.num_tokens == 8
    # 20 tokens need 5 blocks: 2 hits + 3 new, but only 2 free blocks remain beside the hits
    assert not kv.allocate(b, 12, hit)
    assert kv.num_free_blocks == 4 and "b" not in kv.tables
    assert kv.allocate(b, 8, hit)  # 16 tokens: 2 hits + 2 new
    assert kv.num_free_blocks == 0


def test_fork_shares_full_prompt_blocks_and_free_returns_everything():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent = make_request("p", list(range(10)))
    assert kv.allocate(parent, 10)
    parent.num_computed_tokens = 10
    child = make_request("c", list(range(10)))
    child.num_computed_tokens = kv.fork(parent, child)
    assert child.num_computed_tokens == 8
    assert kv.tables["c"] == kv.tables["p"][:2] and kv.tables["p"][0].ref_count == 2
    assert kv.allocate(child, 2)
    assert len(kv.tables["c"]) == 3 and kv.tables["c"][2] is not kv.tables["p"][2]
    kv.forget(parent)
    kv.forget(child)
    assert kv.num_free_blocks == 8 and kv.usage == 0.0


def test_prefix_caching_off_finds_nothing():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    r = make_request("a", list(range(9)))
    kv.allocate(r, 9)
    r.num_computed_tokens = 9
    kv.cache_computed_blocks(r)
    assert kv.find_cached_prefix(make_request("b", list(range(9)))).num_tokens == 0
