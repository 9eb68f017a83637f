"""Per-request block tables on top of the block pool: allocation, prefix-cache hits, forks, frees.

Check-then-act: the scheduler asks `allocate` for the blocks a step needs, and gets False (nothing
changed) when the pool cannot provide them, so it can preempt and ask again.
"""

from __future__ import annotations

from dataclasses import dataclass

from ladle.engine.block_pool import BlockPool, KVBlock, chain_hash
from ladle.engine.request import Request


@dataclass
class PrefixCacheStats:
    num_queried_blocks: int = 0  # full prompt blocks looked up in the cache
    num_hit_blocks: int = 0  # of those, found
    num_evicted_blocks: int = 0  # cached blocks reused for other content

    @property
    def hit_rate(self) -> float:
        return self.num_hit_blocks / self.num_queried_blocks if self.num_queried_blocks else 0.0


@dataclass
class CachedPrefix:
    blocks: list[KVBlock]  # cached blocks covering the start of the request
    num_tokens: int  # tokens they hold (a multiple of the block size)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, cache_namespace: str = ""):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.namespace = cache_namespace  # the model: entries of two models never mix
        self.tables: dict[str, list[KVBlock]] = {}  # request id → its blocks, in token order
        self.hashes: dict[str, list[int]] = {}  # request id → chained hashes of its full blocks
        self.num_cached_blocks: dict[str, int] = {}  # request id → leading blocks already filed
        # full blocks being computed right now: hash → the request computing it. A newcomer whose
        # next uncached block is in here waits a step or two and then finds it cached.
        self.in_flight: dict[int, str] = {}
        self.in_flight_of: dict[str, list[int]] = {}  # request id → hashes it registered
        self.stats = PrefixCacheStats()

    # -- queries -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        """Share of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.tables.get(request_id, ())]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _extra_key(self, request: Request) -> tuple:
        return (self.namespace, request.cache_salt)

    def _block_hashes(self, request: Request, num_full_blocks: int) -> list[int]:
        """Chained hashes of the request's first `num_full_blocks` blocks, computed once each."""
        hashes = self.hashes.setdefault(request.request_id, [])
        bs = self.block_size
        extra = self._extra_key(request)
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(chain_hash(parent, request.tokens(i * bs, (i + 1) * bs), extra))
        return hashes

    # -- prefix cache --------------------------------------------------------------------------

    def find_cached_prefix(self, request: Request) -> CachedPrefix:
        """The longest run of cached blocks at the start of the request. At least one token is
        left to compute, since the step that computes it yields the logits to sample from."""
        if not self.enable_prefix_caching:
            return CachedPrefix([], 0)
        bs = self.block_size
        num_full = (request.num_tokens - 1) // bs
        hashes = self._block_hashes(request, num_full)
        extra = self._extra_key(request)
        found: list[KVBlock] = []
        parent = None
        for i in range(num_full):
            block = self.pool.lookup(hashes[i], tuple(request.tokens(i * bs, (i + 1) * bs)), parent, extra)
            if block is None:
                break
            found.append(block)
            parent = block
        return CachedPrefix(found, len(found) * bs)

    def is_prefix_in_flight(self, request: Request, prefix: CachedPrefix) -> bool:
        """Another running request is computing the block that would extend this cached prefix."""
        if not self.enable_prefix_caching:
            return False
        next_block = prefix.num_tokens // self.block_size
        if next_block >= (request.num_tokens - 1) // self.block_size:
            return False
        owner = self.in_flight.get(self._block_hashes(request, next_block + 1)[next_block])
        return owner is not None and owner != request.request_id

    def _register_in_flight(self, request: Request, first_token: int, end_token: int) -> None:
        bs = self.block_size
        first, end = -(-first_token // bs), min(end_token, request.num_tokens - 1) // bs
        if end <= first:
            return
        hashes = self._block_hashes(request, end)
        mine = self.in_flight_of.setdefault(request.request_id, [])
        for h in hashes[first:end]:
            if h not in self.in_flight:
                self.in_flight[h] = request.request_id
                mine.append(h)

    def _clear_in_flight(self, request_id: str, hashes=None) -> None:
        mine = self.in_flight_of.get(request_id, [])
        for h in list(mine) if hashes is None else hashes:
            if self.in_flight.get(h) == request_id:
                del self.in_flight[h]
        if hashes is None:
            self.in_flight_of.pop(request_id, None)

    def cache_computed_blocks(self, request: Request) -> None:
        """File the request's blocks that became full and computed in the last step."""
        if not self.enable_prefix_caching:
            return
        table = self.tables.get(request.request_id)
        if not table:
            return
        bs = self.block_size
        # computed and known: a stop among accepted guesses leaves computed tokens past the output
        num_full = min(min(request.num_computed_tokens, request.num_tokens) // bs, len(table))
        start = self.num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request, num_full)
        extra = self._extra_key(request)
        for i in range(start, num_full):
            parent = table[i - 1] if i else None
            self.pool.cache(table[i], hashes[i], tuple(request.tokens(i * bs, (i + 1) * bs)), parent, extra)
        self._clear_in_flight(request.request_id, hashes[start:num_full])
        self.num_cached_blocks[request.request_id] = num_full
        self.stats.num_evicted_blocks = self.pool.num_evictions

    # -- allocation ----------------------------------------------------------------------------

    def allocate(self, request: Request, num_new_tokens: int, prefix: CachedPrefix | None = None) -> bool:
        """Make the request's table cover num_computed_tokens (or the cached prefix) + num_new_tokens.
        Returns False, changing nothing, when the pool has too few free blocks."""
        rid = request.request_id
        table = self.tables.get(rid, [])
        hit_blocks = prefix.blocks if prefix and not table else []
        computed = prefix.num_tokens if hit_blocks else request.num_computed_tokens
        need = self.blocks_needed(computed + num_new_tokens) - len(table) - len(hit_blocks)
        # hit blocks nobody holds sit in the free list: taking them shrinks what is free
        reclaimed = sum(1 for b in hit_blocks if b.ref_count == 0)
        if need > self.pool.num_free - reclaimed:
            return False
        if prefix is not None and not table and self.enable_prefix_caching:  # admission: count the lookup
            self.stats.num_queried_blocks += (request.num_tokens - 1) // self.block_size
            self.stats.num_hit_blocks += len(hit_blocks)
        if hit_blocks:
            self.pool.acquire(hit_blocks)
            table = list(hit_blocks)
            self.num_cached_blocks[rid] = len(hit_blocks)
        if need > 0:
            table = table + self.pool.allocate(need)
        self.tables[rid] = table
        if self.enable_prefix_caching:
            self._register_in_flight(request, computed, computed + num_new_tokens)
        return True

    def fork(self, parent: Request, child: Request) -> int:
        """Share the parent's full prompt blocks with another sample of the same prompt. Returns the
        number of tokens the child starts with in the cache (at least one prompt token is left for
        the child to compute, which yields its own first logits)."""
        num_shared = (parent.num_prompt_tokens - 1) // self.block_size
        shared = self.tables.get(parent.request_id, [])[:num_shared]
        self.pool.acquire(shared)
        self.tables[child.request_id] = list(shared)
        self.num_cached_blocks[child.request_id] = min(num_shared, self.num_cached_blocks.get(parent.request_id, 0))
        return len(shared) * self.block_size

    def free(self, request: Request) -> None:
        rid = request.request_id
        table = self.tables.pop(rid, [])
        self.pool.release(reversed(table))
        self.num_cached_blocks.pop(rid, None)
        self._clear_in_flight(rid)

    def forget(self, request: Request) -> None:
        """Drop everything kept for a finished request (its hashes too)."""
        self.free(request)
        self.hashes.pop(request.request_id, None)

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
