"""The pool of KV-cache blocks: reference counts, the free list, and the prefix cache.

Plain Python, no tensors: a block here is a number naming a slab of the runner's KV tensors.

A full block whose K/V are computed can be *cached*: it is filed under a chained hash of its
parent block's hash, its token ids, and extra keys (model, tenant salt), so a later request with
the same prefix reuses it instead of recomputing it. When its last user lets go it joins the free
list but keeps its content: it is handed out again only when it reaches the front of the free list
(least recently used first), and only then forgets what it held.

A hash only finds candidates. A block matches when its own token ids equal the request's and its
parent is the very block (same id, same incarnation) matched one step before, so no collision of
hashes can ever hand a request K/V of other tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(eq=False)
class KVBlock:
    block_id: int  # index into the runner's KV tensors
    ref_count: int = 0  # requests holding it
    epoch: int = 0  # bumped each time the block is reused for other content
    block_hash: int | None = None  # set while the block is in the prefix cache
    token_ids: tuple[int, ...] = ()  # content, compared on every cache hit
    parent: KVBlock | None = None  # the block before it in its request (None: the first)
    parent_epoch: int = 0  # the parent's epoch when this block was cached
    extra_key: tuple = ()  # model and tenant salt, compared for first blocks

    @property
    def is_cached(self) -> bool:
        return self.block_hash is not None


def chain_hash(parent_hash: int | None, token_ids: Sequence[int], extra_key: tuple) -> int:
    return hash((parent_hash, tuple(token_ids), extra_key))


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)  # LRU first
        self.cached: dict[int, KVBlock] = {}  # block hash → block
        self.num_evictions = 0  # cached blocks given new content

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks no request holds (cached or not): what allocation can draw on."""
        return len(self.free)

    def allocate(self, count: int) -> list[KVBlock]:
        """`count` blocks with a reference each, least recently used first. The caller checks
        `num_free` first: asking for more than that is a bug."""
        if count > len(self.free):
            raise RuntimeError(f"asked for {count} KV blocks with only {len(self.free)} free")
        out = []
        for _ in range(count):
            _, block = self.free.popitem(last=False)
            self._forget(block)
            block.ref_count = 1
            out.append(block)
        return out

    def _forget(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            self.num_evictions += 1
        block.block_hash, block.token_ids, block.parent, block.extra_key = None, (), None, ()
        block.epoch += 1

    def acquire(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on blocks found in the cache (or shared with a fork)."""
        for block in blocks:
            if block.ref_count == 0:
                del self.free[block.block_id]
            block.ref_count += 1

    def release(self, blocks: Iterable[KVBlock]) -> None:
        """Drop a reference; blocks nobody holds join the free list's most-recent end. Release a
        request's blocks last-first, so that its prefix outlives its tail in the cache."""
        for block in blocks:
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"KV block {block.block_id} released more often than taken")
            if block.ref_count == 0:
                self.free[block.block_id] = block

    def cache(
        self, block: KVBlock, block_hash: int, token_ids: tuple[int, ...], parent: KVBlock | None, extra_key: tuple
    ) -> None:
        """File a full, computed block under its hash. If another block already holds the same
        content, the first one stays the cache entry."""
        if block.is_cached:
            return
        block.token_ids, block.parent, block.extra_key = token_ids, parent, extra_key
        block.parent_epoch = parent.epoch if parent is not None else 0
        if block_hash not in self.cached:
            block.block_hash = block_hash
            self.cached[block_hash] = block

    def lookup(
        self, block_hash: int, token_ids: tuple[int, ...], parent: KVBlock | None, extra_key: tuple
    ) -> KVBlock | None:
        block = self.cached.get(block_hash)
        if block is None or block.token_ids != token_ids:
            return None
        if parent is None:
            return block if block.parent is None and block.extra_key == extra_key else None
        if block.parent is not parent or block.parent_epoch != parent.epoch:
            return None
        return block

    def reset_prefix_cache(self) -> None:
        for block in list(self.cached.values()):
            block.block_hash = None
        self.cached.clear()
