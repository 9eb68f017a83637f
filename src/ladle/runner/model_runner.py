"""Turns one scheduled step into tensors, runs the model once, returns logits.

The only layer that touches torch devices. A step is a list of `StepChunk`s, one per request:
the tokens to compute now, how many of the request's tokens the KV cache already holds, and the
request's block table. Prefill chunks and decodes of many requests go through one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ladle.model.attention import AttentionMetadata, PrefillChunk
from ladle.model.loader import LoadedModel
from ladle.runner.step import StepBatch, StepResult
from ladle.sample.sampler import Sampler


@dataclass
class StepChunk:
    token_ids: list[int]  # tokens of the request computed in this step
    num_computed: int  # tokens of the request already in the KV cache (= position of token_ids[0])
    block_table: list[int]  # the request's KV blocks, covering num_computed + len(token_ids)
    needs_logits: bool = True  # the step ends at a position that samples (last prompt chunk, decode)


class KVCache:
    """Per layer a (K, V) pair of [num_kv_heads, num_blocks, block_size, head_dim] tensors."""

    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int):
        spec = loaded.spec
        shape = (spec.num_kv_heads, num_blocks, block_size, spec.head_dim)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.layers = [
            (
                torch.zeros(shape, dtype=loaded.dtype, device=loaded.device),
                torch.zeros(shape, dtype=loaded.dtype, device=loaded.device),
            )
            for _ in range(spec.num_layers)
        ]

    @staticmethod
    def bytes_per_block(loaded: LoadedModel, block_size: int) -> int:
        return block_size * loaded.spec.kv_bytes_per_token(loaded.dtype.itemsize)


class ModelRunner:
    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int = 16, seed: int = 0):
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.block_size = block_size
        self.kv_cache = KVCache(loaded, num_blocks, block_size)
        self.sampler = Sampler(seed)
        self.generators: dict[str, torch.Generator] = {}  # request id → its seeded generator

    @torch.inference_mode()
    def execute_step(self, batch: StepBatch) -> StepResult:
        """One engine step: forward every scheduled token, sample the requests that sample."""
        for request_id in batch.finished_request_ids:
            self.generators.pop(request_id, None)
        chunks = [
            StepChunk(r.token_ids, r.num_computed, r.block_ids, needs_logits=r.sample is not None)
            for r in batch.requests
        ]
        sampling = [r for r in batch.requests if r.sample is not None]
        if not sampling:
            self.execute(chunks)
            return StepResult([], [])
        logits = self.execute(chunks)
        out = self.sampler(logits, [r.sample for r in sampling], [self._generator(r) for r in sampling])
        return StepResult(out.token_ids.tolist(), out.logprobs)  # the step's one device-to-host copy

    def _generator(self, request) -> torch.Generator | None:
        seed = request.sample.params.seed
        if seed is None:
            return None
        g = self.generators.get(request.request_id)
        if g is None:
            g = self.generators[request.request_id] = torch.Generator(self.device).manual_seed(seed)
        return g

    @torch.inference_mode()
    def execute(self, chunks: list[StepChunk]) -> torch.Tensor:
        """Run one step. Returns float32 logits [N, vocab], one row per chunk with needs_logits,
        in the order of `chunks`."""
        input_ids, positions, meta, logit_rows = self.prepare(chunks)
        hidden = self.model(input_ids, positions, self.kv_cache.layers, meta)
        if not len(logit_rows):
            return hidden.new_empty((0, self.loaded.spec.vocab_size), dtype=torch.float32)
        return self.model.compute_logits(hidden[logit_rows])

    def prepare(self, chunks: list[StepChunk]):
        """Flat batch with the decodes first (one token each), then the prefill chunks."""
        order = sorted(range(len(chunks)), key=lambda i: len(chunks[i].token_ids) != 1)
        num_decodes = sum(1 for c in chunks if len(c.token_ids) == 1)
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        last_row: dict[int, int] = {}
        prefills: list[PrefillChunk] = []
        bs = self.block_size
        for rank, i in enumerate(order):
            c = chunks[i]
            start = len(ids)
            n = len(c.token_ids)
            ids.extend(c.token_ids)
            span = range(c.num_computed, c.num_computed + n)
            pos.extend(span)
            slots.extend(c.block_table[p // bs] * bs + p % bs for p in span)
            last_row[i] = start + n - 1
            if rank >= num_decodes:
                table = torch.tensor(c.block_table[: -(-(c.num_computed + n) // bs)], dtype=torch.int64)
                prefills.append(PrefillChunk(start, n, c.num_computed + n, table.to(self.device)))
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots),
            num_decode_tokens=num_decodes,
            decode_block_tables=None,
            decode_context_lens=None,
            prefills=prefills,
        )
        if num_decodes:
            self._decode_meta(meta, [chunks[i] for i in order[:num_decodes]])
        logit_rows = self._tensor([last_row[i] for i, c in enumerate(chunks) if c.needs_logits])
        return self._tensor(ids), self._tensor(pos), meta, logit_rows

    def _decode_meta(self, meta: AttentionMetadata, decodes: list[StepChunk]) -> None:
        bs = self.block_size
        lens = [c.num_computed + 1 for c in decodes]
        width = -(-max(lens) // bs)
        tables = [c.block_table[:width] + [0] * (width - min(width, len(c.block_table))) for c in decodes]
        meta.decode_block_tables = self._tensor(tables)
        meta.decode_context_lens = self._tensor(lens)
        meta.max_decode_context_len = max(lens)

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64).to(self.device, non_blocking=True)
