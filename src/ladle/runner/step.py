"""What the engine hands the runner for one step, and what it gets back. Plain data, no torch:
the engine (pure Python) builds it, the runner turns it into tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

from ladle.sample.params import SampleSpec, SamplingParams, TokenLogprobs

__all__ = ["DraftRequest", "SampleSpec", "StepBatch", "StepRequest", "StepResult", "TokenLogprobs"]


@dataclass
class StepRequest:
    request_id: str  # keys per-request state in the runner (its seeded generator)
    token_ids: list[int]  # tokens computed this step (the last num_spec of them are guesses)
    num_computed: int  # tokens of the request already in the KV cache
    block_ids: list[int]  # its block table, covering num_computed + len(token_ids)
    # empty when this step does not sample the request; else one per position that samples: the
    # request's next token, and with num_spec guesses the token after each guess (1 + num_spec)
    samples: list[SampleSpec] = field(default_factory=list)
    num_spec: int = 0  # speculative tokens at the end of token_ids, to verify
    # prompt logprobs: the prompt tokens that follow the chunk's first len(prompt_targets) positions,
    # whose logprobs (and prompt_logprobs best alternatives) this step computes; empty: none
    prompt_targets: list[int] = field(default_factory=list)
    prompt_logprobs: int = 0  # alternatives per prompt position, with prompt_targets


@dataclass
class StepBatch:
    requests: list[StepRequest]  # in the scheduler's order


@dataclass
class StepResult:
    # per request that samples, in batch order: the accepted guesses, then the one token sampled
    # after them (a single token without speculation)
    sampled_token_ids: list[list[int]]
    logprobs: list[list[TokenLogprobs] | None]  # aligned with sampled_token_ids
    # request id → one entry per prompt target of its StepRequest (requests that asked for them)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)


@dataclass
class DraftRequest:
    """Ask the draft model for k guesses: compute `token_ids` (its K/V is missing from the draft's
    cache; the last one is the request's newest token) from position num_computed on, then draft."""

    request_id: str
    token_ids: list[int]
    num_computed: int
    block_ids: list[int]  # the request's block table, covering num_computed + len(token_ids) + k - 1
    k: int
    params: SamplingParams
    output_token_ids: list[int]  # the request's output so far: the guesses' positions and penalties
