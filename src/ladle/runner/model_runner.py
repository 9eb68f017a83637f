"""Turns one scheduled step into tensors, runs the model once, returns logits.

The only layer that touches torch devices. A step is a list of `StepChunk`s, one per request:
the tokens to compute now, how many of the request's tokens the KV cache already holds, and the
request's block table. Prefill chunks and decodes of many requests go through one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ladle.model.attention import BACKENDS, AttentionMetadata, PrefillChunk
from ladle.model.decode_plan import build_decode_plan
from ladle.model.loader import LoadedModel
from ladle.runner.step import DraftRequest, StepBatch, StepResult
from ladle.sample.params import SampleSpec
from ladle.sample.sampler import SampleGroup, Sampler, prompt_logprobs


@dataclass
class StepChunk:
    token_ids: list[int]  # tokens of the request computed in this step
    num_computed: int  # tokens of the request already in the KV cache (= position of token_ids[0])
    block_table: list[int]  # the request's KV blocks, covering num_computed + len(token_ids)
    num_logits: int = 1  # logits for the last this-many positions (0: a prompt chunk that samples nothing)


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
    def __init__(
        self,
        loaded: LoadedModel,
        num_blocks: int,
        block_size: int = 16,
        seed: int = 0,
        draft: LoadedModel | None = None,
    ):
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.block_size = block_size
        self.kv_cache = KVCache(loaded, num_blocks, block_size)
        # every token as a decode of its own, where the backend computes attention that way
        self.rows_as_decodes = BACKENDS[loaded.attention_backend].rows_as_decodes
        # steps run as one compiled call where the model has that form (the CPU with the `cpu`
        # backend, which computes every token as a decode)
        self.decode_plan = build_decode_plan(self.model, self.kv_cache.layers)
        self.sampler = Sampler(seed)
        # speculative decoding with a draft model: its own runner and KV cache, under the same block
        # ids as ours; it draws its guesses with the uniforms the verification will use
        self.drafter = ModelRunner(draft, num_blocks, block_size) if draft is not None else None

    @torch.inference_mode()
    def execute_step(self, batch: StepBatch) -> StepResult:
        """One engine step: forward every scheduled token, sample (and verify) the requests that sample."""
        if any(r.prompt_targets for r in batch.requests):
            return self._execute_with_prompt_logprobs(batch)
        chunks = [
            StepChunk(r.token_ids, r.num_computed, r.block_ids, num_logits=len(r.samples)) for r in batch.requests
        ]
        return self._sample(self.execute(chunks), batch)

    def _sample(self, logits: torch.Tensor, batch: StepBatch) -> StepResult:
        """Sample (and verify) the requests that sample; `logits` holds their rows, in batch order."""
        sampling = [r for r in batch.requests if r.samples]
        if not sampling:
            return StepResult([], [])
        groups = [
            SampleGroup(r.samples, r.token_ids[len(r.token_ids) - r.num_spec :] if r.num_spec else []) for r in sampling
        ]
        tokens, logprobs = self.sampler.sample(logits, groups)
        return StepResult(tokens, logprobs)

    def _execute_with_prompt_logprobs(self, batch: StepBatch) -> StepResult:
        """A step in which some requests want their prompt's logprobs: those compute logits at every
        position of their chunk (the others still only where they sample); the prompt rows go to
        the logprobs, the sampling rows to the sampler."""
        requests = batch.requests
        num_logits = [len(r.token_ids) if r.prompt_targets else len(r.samples) for r in requests]
        chunks = [
            StepChunk(r.token_ids, r.num_computed, r.block_ids, num_logits=n)
            for r, n in zip(requests, num_logits, strict=True)
        ]
        logits = self.execute(chunks)  # [sum(num_logits), V] float32
        sample_rows, prompt_rows, targets, ks, owners = [], [], [], [], []
        first = 0
        for r, n in zip(requests, num_logits, strict=True):
            sample_rows.extend(range(first + n - len(r.samples), first + n))
            prompt_rows.extend(range(first, first + len(r.prompt_targets)))
            targets.extend(r.prompt_targets)
            ks.extend([r.prompt_logprobs] * len(r.prompt_targets))
            owners.extend([r.request_id] * len(r.prompt_targets))
            first += n
        result = self._sample(logits[self._tensor(sample_rows)], batch)
        entries = prompt_logprobs(logits[self._tensor(prompt_rows)], targets, ks)
        for owner, entry in zip(owners, entries, strict=True):
            result.prompt_logprobs.setdefault(owner, []).append(entry)
        return result

    @torch.inference_mode()
    def propose(self, asks: list[DraftRequest]) -> list[list[int]]:
        """k guesses per request from the draft model: catch its KV cache up on the request's tokens,
        then run single-token steps. Each guess is the draft's draw with the uniform the target's
        verification uses at that output position (greedy: the draft's argmax)."""
        drafter = self.drafter
        guesses: list[list[int]] = [[] for _ in asks]
        chunks = [StepChunk(a.token_ids, a.num_computed, a.block_ids) for a in asks]
        live = list(range(len(asks)))
        while live:
            logits = drafter.execute([chunks[i] for i in live])
            specs = [SampleSpec(asks[i].params, [], asks[i].output_token_ids + guesses[i]) for i in live]
            out = self.sampler(logits, specs)
            for i, token in zip(live, out.token_ids.tolist(), strict=True):
                guesses[i].append(token)
                position = chunks[i].num_computed + len(chunks[i].token_ids)
                chunks[i] = StepChunk([token], position, asks[i].block_ids)
            live = [i for i in live if len(guesses[i]) < asks[i].k]
        return guesses

    @torch.inference_mode()
    def execute(self, chunks: list[StepChunk]) -> torch.Tensor:
        """Run one step. Returns float32 logits [N, vocab]: each chunk's last num_logits positions,
        in the order of `chunks`."""
        input_ids, positions, meta, logit_rows = self.prepare(chunks)
        plan, rows = self.decode_plan, len(input_ids)
        if plan is not None and rows <= plan.max_rows:  # the plan's backend fills the row tables
            hidden = plan.run(input_ids, positions, meta.slot_mapping, meta.row_block_tables, meta.row_context_lens)
        else:
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
        last_row: list[int] = [0] * len(chunks)
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
        if self.rows_as_decodes:
            self._row_meta(meta, [chunks[i] for i in order], num_decodes)
        rows = [r for i, c in enumerate(chunks) for r in range(last_row[i] - c.num_logits + 1, last_row[i] + 1)]
        logit_rows = self._tensor(rows)
        return self._tensor(ids), self._tensor(pos), meta, logit_rows

    def _decode_meta(self, meta: AttentionMetadata, decodes: list[StepChunk]) -> None:
        bs = self.block_size
        lens = [c.num_computed + 1 for c in decodes]
        width = -(-max(lens) // bs)
        tables = [_padded_table(c.block_table, width) for c in decodes]
        meta.decode_block_tables = self._tensor(tables)
        meta.decode_context_lens = self._tensor(lens)
        meta.max_decode_context_len = max(lens)

    def _row_meta(self, meta: AttentionMetadata, ordered: list[StepChunk], num_decodes: int) -> None:
        """Each token's request block table and context length (its position + 1), in batch order."""
        if num_decodes == len(ordered):  # decodes only: the decode tables are the rows' tables
            meta.row_block_tables, meta.row_context_lens = meta.decode_block_tables, meta.decode_context_lens
            return
        bs = self.block_size
        width = max(-(-(c.num_computed + len(c.token_ids)) // bs) for c in ordered)
        tables, lens = [], []
        for c in ordered:
            n = len(c.token_ids)
            tables.append(torch.tensor(_padded_table(c.block_table, width), dtype=torch.int64).expand(n, width))
            lens.append(torch.arange(c.num_computed + 1, c.num_computed + n + 1, dtype=torch.int64))
        meta.row_block_tables = torch.cat(tables).to(self.device)
        meta.row_context_lens = torch.cat(lens).to(self.device)

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64).to(self.device, non_blocking=True)


def _padded_table(block_table: list[int], width: int) -> list[int]:
    """The first `width` block ids, padded with block 0 (never read past the context length)."""
    return block_table[:width] + [0] * (width - min(width, len(block_table)))


@torch.inference_mode()
def prefill_hidden_states(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    """One prefill of `ids` on a cache of its own: the final-normed hidden states [T, hidden]. What
    w8a8's calibration runs (the loader receives it: the model layer does not build steps)."""
    block_size = 16
    num_blocks = -(-len(ids) // block_size)
    runner = ModelRunner(loaded, num_blocks=num_blocks, block_size=block_size)
    input_ids, positions, meta, _ = runner.prepare([StepChunk(ids, 0, list(range(num_blocks)), num_logits=0)])
    return runner.model(input_ids, positions, runner.kv_cache.layers, meta)
