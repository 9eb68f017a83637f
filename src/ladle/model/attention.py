"""Attention over a paged KV cache.

The KV cache of one layer is a pair of tensors [num_kv_heads, num_blocks, block_size, head_dim]. A
request owns a list of blocks (its block table); token p of the request lives in slot
`block_table[p // block_size] * block_size + p % block_size`. Heads come first so that gathering a
request's blocks yields [heads, tokens, head_dim] ready for matmul, with no transposing copy.

One step's flat batch is ordered decodes first (requests adding exactly one token), then prefill
chunks. The runner describes it with `AttentionMetadata`; a backend (registered by name) computes
attention for every token of the step and writes the new K/V into the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    query_start: int  # index of the chunk's first token in the flat batch
    num_query_tokens: int  # tokens of this request computed in this step
    context_len: int  # tokens of the request in the cache after this step (cached + new)
    block_table: torch.Tensor  # [num_blocks] int64: the request's blocks covering context_len


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot written by each token of the step
    num_decode_tokens: int  # the first num_decode_tokens tokens are decodes, one per request
    decode_block_tables: torch.Tensor | None  # [B_dec, max_blocks] int64, padded with 0
    decode_context_lens: torch.Tensor | None  # [B_dec] int64: context length incl. the new token
    prefills: list[PrefillChunk] = field(default_factory=list)  # after the decodes, in batch order
    max_decode_context_len: int = 0  # max of decode_context_lens, as a Python int (no device sync)
    # every token of the step as a decode of its own (for backends with rows_as_decodes):
    row_block_tables: torch.Tensor | None = None  # [T, max_blocks] int64: the block table of each token's request
    row_context_lens: torch.Tensor | None = None  # [T] int64: each token's position + 1


class AttentionBackend:
    """Computes attention for one layer. Subclasses register under a name in BACKENDS."""

    name = ""
    # True: the backend computes every token as a decode (its own query row over its request's
    # cache up to its position), so a token's attention is the same bits whether it came in a
    # prompt chunk of any size, a recomputation, a speculative verification or a decode step. The
    # runner then fills AttentionMetadata.row_block_tables and row_context_lens.
    rows_as_decodes = False

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: tuple[torch.Tensor, torch.Tensor],  # ([Hkv, NB, BS, D], [Hkv, NB, BS, D])
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, Hq, D]
        raise NotImplementedError


BACKENDS: dict[str, type[AttentionBackend]] = {}


def register_backend(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    BACKENDS[cls.name] = cls
    return cls


def resolve_backend_name(name: str, device_type: str) -> str:
    """`auto`: the C++ paged kernel on a CPU where it builds, PyTorch SDPA elsewhere."""
    if name != "auto":
        return name
    return "cpu" if device_type == "cpu" and PagedCPUBackend.available() else "sdpa"


def get_backend(name: str) -> AttentionBackend:
    if name not in BACKENDS:
        from ladle.errors import LadleError

        raise LadleError(f"unknown attention backend {name!r} (available: {', '.join(sorted(BACKENDS))})")
    return BACKENDS[name]()


def write_kv(kv_cache: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor):
    """k, v [T, Hkv, D] into their slots."""
    k_cache, v_cache = kv_cache
    num_kv_heads, num_blocks, block_size, head_dim = k_cache.shape
    k_cache.view(num_kv_heads, num_blocks * block_size, head_dim).index_copy_(1, slots, k.transpose(0, 1))
    v_cache.view(num_kv_heads, num_blocks * block_size, head_dim).index_copy_(1, slots, v.transpose(0, 1))


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Block ids [nb] → [Hkv, length, D]; [B, nb] → [Hkv, B, length, D] (the first `length` tokens)."""
    num_kv_heads, _, block_size, head_dim = cache.shape
    blocks = cache.index_select(1, block_table.reshape(-1))  # [Hkv, B*nb, BS, D], one copy
    tokens = blocks.view(num_kv_heads, *block_table.shape[:-1], block_table.shape[-1] * block_size, head_dim)
    return tokens[..., :length, :]


@register_backend
class TorchSDPABackend(AttentionBackend):
    """Portable backend: batched decode attention with grouped heads, one SDPA call per prefill."""

    name = "sdpa"

    def forward(self, q, k, v, kv_cache, meta, scale):
        self.write_kv(kv_cache, k, v, meta.slot_mapping)
        if not meta.prefills and meta.num_decode_tokens == q.shape[0]:  # decodes only: their attention is the output
            return self._decode(q, kv_cache, meta, scale)
        out = torch.empty_like(q)
        n_dec = meta.num_decode_tokens
        if n_dec:
            out[:n_dec] = self._decode(q[:n_dec], kv_cache, meta, scale)
        for chunk in meta.prefills:
            span = slice(chunk.query_start, chunk.query_start + chunk.num_query_tokens)
            out[span] = self._prefill(q[span], k[span], v[span], kv_cache, chunk, scale)
        return out

    @staticmethod
    def write_kv(kv_cache, k, v, slots) -> None:
        write_kv(kv_cache, k, v, slots)

    @staticmethod
    def _decode(q, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        # One query per request: group the query heads that share a KV head, so K/V are read once.
        k_cache, v_cache = kv_cache
        batch, num_heads, head_dim = q.shape
        num_kv_heads = k_cache.shape[0]
        length = meta.max_decode_context_len
        keys = gather_kv(k_cache, meta.decode_block_tables, length)  # [Hkv, B, L, D]
        values = gather_kv(v_cache, meta.decode_block_tables, length)
        qg = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim).transpose(0, 1)  # [Hkv, B, G, D]
        scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * scale  # [Hkv, B, G, L]
        positions = torch.arange(length, device=q.device)
        masked = positions[None, :] >= meta.decode_context_lens[:, None]  # [B, L]
        scores.masked_fill_(masked[None, :, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        out = torch.matmul(probs, values)  # [Hkv, B, G, D]
        return out.transpose(0, 1).reshape(batch, num_heads, head_dim)

    @staticmethod
    def _prefill(q, k, v, kv_cache, chunk: PrefillChunk, scale: float) -> torch.Tensor:
        n = chunk.num_query_tokens
        if chunk.context_len == n:  # nothing cached before this chunk: attend to the new tokens only
            keys, values = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, n, D]
            mask, causal = None, True
        else:  # a prefix is cached (prefix-cache hit or an earlier chunk): read it through the table
            keys = gather_kv(kv_cache[0], chunk.block_table, chunk.context_len)  # [Hkv, context_len, D]
            values = gather_kv(kv_cache[1], chunk.block_table, chunk.context_len)
            offset = chunk.context_len - n
            key_pos = torch.arange(chunk.context_len, device=q.device)
            query_pos = torch.arange(n, device=q.device) + offset
            mask, causal = key_pos[None, :] <= query_pos[:, None], False  # [n, context_len]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),  # [1, Hq, n, D]
            keys.unsqueeze(0),
            values.unsqueeze(0),
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=True,
        )
        return out.squeeze(0).transpose(0, 1)  # [n, Hq, D]


@register_backend
class PagedCPUBackend(TorchSDPABackend):
    """Attention by a C++ kernel that reads K/V in place through the block tables (no gathered
    copy), for every token of the step: a prompt token is computed as the decode of its position
    would be. The batch, the chunking of a prompt, a prefix-cache hit, a recomputation after
    preemption and a speculative verification then leave every token's bits unchanged (a test
    holds it). Cost against SDPA's tiled prefill: see the README's identity section."""

    name = "cpu"
    rows_as_decodes = True
    _kernels = None  # one compiled module per process, shared by every model

    @classmethod
    def loader(cls):
        if cls._kernels is None:
            from ladle.model.cpu_kernels import KernelLoader

            cls._kernels = KernelLoader()
        return cls._kernels

    @classmethod
    def available(cls) -> bool:
        return cls.loader().load() is not None

    def __init__(self):
        module = self.loader().load()
        if module is None:
            from ladle.errors import LadleError

            raise LadleError(f"the cpu attention backend could not be built ({self.loader().failure}); use sdpa")
        self.kernel = module.paged_decode_attention
        self.write_slots = module.write_kv_slots

    def forward(self, q, k, v, kv_cache, meta, scale):
        if q.device.type != "cpu" or meta.row_block_tables is None:
            return super().forward(q, k, v, kv_cache, meta, scale)
        self.write_kv(kv_cache, k, v, meta.slot_mapping)  # every token's K/V first: the rows read them
        tables, lens = meta.row_block_tables, meta.row_context_lens
        return self.kernel(q.contiguous(), kv_cache[0], kv_cache[1], tables, lens, scale)

    def write_kv(self, kv_cache, k, v, slots):
        if k.device.type != "cpu":
            return write_kv(kv_cache, k, v, slots)
        self.write_slots(kv_cache[0], kv_cache[1], k, v, slots)

    def _decode(self, q, kv_cache, meta, scale):
        if q.device.type != "cpu":
            return TorchSDPABackend._decode(q, kv_cache, meta, scale)
        return self.kernel(
            q.contiguous(), kv_cache[0], kv_cache[1], meta.decode_block_tables, meta.decode_context_lens, scale
        )
