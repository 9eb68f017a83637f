"""A request's life in the engine: its tokens, how many are in the KV cache, and why it ended."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from ladle.sample.params import SamplingParams, TokenLogprobs


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued: not started, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds KV blocks and is scheduled every step
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token or stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # the client went away, the server drains, or the request was cancelled
    TIMEOUT = "timeout"  # still waiting at its queue deadline: never started, never served late


def output_budget(max_tokens: int | None, prompt_len: int, max_total_tokens: int) -> int:
    """Output tokens allowed: max_tokens (None: no limit), cut to what fits in the context."""
    room = max_total_tokens - prompt_len
    return room if max_tokens is None else min(max_tokens, room)


@dataclass(frozen=True)
class GenerateRequest:
    """What a caller asks to generate, as one value: the server builds it, the router, an endpoint
    and the async engine pass it on unchanged, and EngineCore.add_request takes its fields. A field
    a later feature needs is added here, not to every signature on the way."""

    request_id: str  # unique in the engine while the request lives
    prompt_token_ids: list[int]
    params: SamplingParams  # n samples are forked from it
    priority: int = 0  # lower is served first under the priority policy
    cache_salt: str | None = None  # isolates prefix-cache entries (per tenant)
    deadline_s: float | None = None  # monotonic time by which it must have started (None: none)
    tenant: str = "default"  # who it is for: fair scheduling counts its tokens to this tenant
    weight: float = 1.0  # the tenant's share under fair scheduling (vtc)


@dataclass
class Request:
    request_id: str  # unique while the request lives
    prompt_token_ids: list[int]  # the prompt, tokenized
    params: SamplingParams  # one sample's parameters (n == 1)
    eos_token_ids: tuple[int, ...] = ()  # the model's stop ids, honoured unless params.ignore_eos
    priority: int = 0  # lower is served first under the priority policy
    cache_salt: str | None = None  # isolates prefix-cache entries (per tenant)
    tenant: str = "default"  # who it is for (fair scheduling)
    weight: float = 1.0  # the tenant's share under fair scheduling
    engine_time_s: float = 0.0  # its share of the compute of the steps it was in (split by tokens)
    max_total_tokens: int = 0  # prompt + output may not exceed this (the context length)
    arrival_s: float = field(default_factory=time.monotonic)  # when it entered the engine
    output_token_ids: list[int] = field(default_factory=list)  # generated so far
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = -1  # prompt tokens found in the prefix cache at first schedule (-1: not yet)
    num_preemptions: int = 0  # times its blocks were taken back
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token that ended it
    first_scheduled_s: float | None = None  # when it first got compute (queue time ends)
    first_token_s: float | None = None  # when its first output token was sampled
    deadline_s: float | None = None  # monotonic time by which it must have started, else it times out
    parent_id: str | None = None  # for the 2nd..nth sample of an n > 1 request: the first sample
    num_forks_pending: int = 0  # samples waiting to share this request's prompt blocks
    spec_token_ids: list[int] = field(default_factory=list)  # guessed next tokens, checked by the next step
    num_draft_computed: int = 0  # leading tokens whose K/V the draft model holds (draft speculation)
    matcher: object | None = None  # its grammar's state (llguidance), where params.structured constrains it
    # with params.prompt_logprobs: per prompt token computed so far its logprobs (None for the first)
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    prompt_logprobs_reported: bool = False  # they went out with an output

    @property
    def needs_prompt_logprobs(self) -> bool:
        """It asked for its prompt's logprobs and has not computed them all: it computes its whole
        prompt itself (no prefix-cache hit) until it has."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token_at(self, index: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < p else self.output_token_ids[index - p]

    def tokens(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @property
    def max_output_tokens(self) -> int:
        """Output tokens allowed: max_tokens, cut to what fits in the context."""
        return output_budget(self.params.max_tokens, len(self.prompt_token_ids), self.max_total_tokens)
