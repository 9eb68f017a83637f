"""Proposers for speculative decoding: after each step, guess the next K tokens of the requests that
decode, so the next step checks them all in one forward pass.

- `NgramProposer` (prompt lookup): find the latest earlier occurrence of the request's last n tokens
  (n from ngram_max down to ngram_min) in its prompt and output, and propose what followed it. Pure
  Python, with an index per request that grows by the new tokens only, so a step costs O(new tokens).
- `DraftProposer`: a smaller model with the same tokenizer runs K single-token steps. Its KV cache
  lives in the runner under the same block ids as the target's (the same block manager), so this
  side only says which tokens the draft still has to compute and where they go.

Which requests speculate, and how many tokens, is decided here too (`SpeculationPolicy`): only
decoding requests that did not opt out, never past max_tokens, and nobody while the batch is larger
than `disable_batch_size` (large batches are compute-bound: verifying K guesses costs more than it saves).
"""

from __future__ import annotations

from dataclasses import dataclass

from ladle.config import SpeculativeConfig
from ladle.engine.kv_manager import KVCacheManager
from ladle.engine.request import Request
from ladle.runner.step import DraftRequest


class NgramIndex:
    """n-gram → the position right after its latest occurrence, for every n in [n_min, n_max]."""

    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max
        self.latest: dict[tuple[int, ...], int] = {}
        self.indexed_end = 0  # n-grams ending before this position are in `latest`

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
        end = len(tokens)
        # index the n-grams that end before the last position (the suffix itself must not match itself)
        for stop in range(max(self.indexed_end, 1), end):
            for n in range(self.n_min, min(self.n_max, stop) + 1):
                self.latest[tuple(tokens[stop - n : stop])] = stop
        self.indexed_end = max(self.indexed_end, end)
        for n in range(min(self.n_max, end - 1), self.n_min - 1, -1):
            after = self.latest.get(tuple(tokens[end - n :]))
            if after is not None:
                return tokens[after : min(after + k, end)]
        return []


def propose_ngram(tokens: list[int], k: int, n_min: int = 1, n_max: int = 4) -> list[int]:
    """One-shot form of NgramIndex.propose (for tests and tools)."""
    return NgramIndex(n_min, n_max).propose(tokens, k)


@dataclass
class SpeculationPolicy:
    config: SpeculativeConfig

    def num_tokens(self, request: Request, batch_size: int) -> int:
        """How many tokens to propose for this request now (0 = none)."""
        c = self.config
        if not c.enabled or not request.params.speculative:
            return 0
        if c.disable_batch_size and batch_size > c.disable_batch_size:
            return 0
        if request.num_tokens - request.num_computed_tokens != 1:
            return 0  # still prefilling
        # a step emits the accepted guesses plus one token of its own: stay within max_tokens
        room = request.max_output_tokens - len(request.output_token_ids) - 1
        return max(0, min(c.num_speculative_tokens, room))


class NgramProposer:
    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self.indexes: dict[str, NgramIndex] = {}

    def propose(self, requests: list[Request], ks: list[int]) -> list[list[int]]:
        out = []
        for request, k in zip(requests, ks, strict=True):
            index = self.indexes.get(request.request_id)
            if index is None:
                index = self.indexes[request.request_id] = NgramIndex(self.config.ngram_min, self.config.ngram_max)
            out.append(index.propose(request.all_token_ids, k))
        return out

    def on_verified(self, request: Request, num_proposed: int, num_accepted: int) -> None:
        pass

    def drop(self, request_id: str) -> None:
        self.indexes.pop(request_id, None)


class DraftProposer:
    """Asks the executor's draft model for proposals. Before that it makes sure every request's block
    table covers the positions the draft writes (and the next step verifies): when the KV cache is too
    full for that, the request simply does not speculate this time (speculation never preempts)."""

    def __init__(self, config: SpeculativeConfig, executor, kv: KVCacheManager):
        self.config = config
        self.executor = executor  # has propose(list[DraftRequest]) -> list[list[int]]
        self.kv = kv

    def propose(self, requests: list[Request], ks: list[int]) -> list[list[int]]:
        asks, where = [], []
        for i, (r, k) in enumerate(zip(requests, ks, strict=True)):
            if not self.kv.allocate(r, 1 + k):  # the last token and k guesses, from num_computed_tokens
                continue
            start = min(r.num_draft_computed, r.num_tokens - 1)
            asks.append(
                DraftRequest(
                    r.request_id,
                    r.tokens(start, r.num_tokens),
                    start,
                    self.kv.block_ids(r.request_id),
                    k,
                    r.params,
                    r.output_token_ids,
                )
            )
            where.append(i)
        out: list[list[int]] = [[] for _ in requests]
        if asks:
            for i, proposal in zip(where, self.executor.propose(asks), strict=True):
                out[i] = proposal
                requests[i].num_draft_computed = requests[i].num_tokens
        return out

    def on_verified(self, request: Request, num_proposed: int, num_accepted: int) -> None:
        """The draft computed K/V for its first num_proposed - 1 guesses while proposing; the
        accepted ones among them need no recomputation."""
        request.num_draft_computed += min(num_accepted, max(num_proposed - 1, 0))

    def drop(self, request_id: str) -> None:
        pass  # no state per request: the draft's K/V sits in the request's blocks
