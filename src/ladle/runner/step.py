"""What the engine hands the runner for one step, and what it gets back. Plain data, no torch:
the engine (pure Python) builds it, the runner turns it into tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

from ladle.sample.params import SampleSpec, TokenLogprobs

__all__ = ["SampleSpec", "StepBatch", "StepRequest", "StepResult", "TokenLogprobs"]


@dataclass
class StepRequest:
    request_id: str  # keys per-request state in the runner (its seeded generator)
    token_ids: list[int]  # tokens computed this step
    num_computed: int  # tokens of the request already in the KV cache
    block_ids: list[int]  # its block table, covering num_computed + len(token_ids)
    sample: SampleSpec | None  # set when this step samples the request's next token


@dataclass
class StepBatch:
    requests: list[StepRequest]  # in the scheduler's order
    finished_request_ids: list[str] = field(default_factory=list)  # per-request state to drop


@dataclass
class StepResult:
    sampled_token_ids: list[int]  # one per request with a SampleSpec, in batch order
    logprobs: list[TokenLogprobs | None]  # aligned with sampled_token_ids
