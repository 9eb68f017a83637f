"""What the engine reports: per step, a delta for every request that moved; per request, a result."""

from __future__ import annotations

from dataclasses import dataclass, field

from ladle.sample.params import TokenLogprobs


@dataclass
class RequestOutput:
    """A request's progress in one step (a delta: only what is new)."""

    request_id: str  # the id the caller gave (shared by the n samples of one request)
    index: int  # which of the n samples
    new_token_ids: list[int]  # tokens sampled this step
    new_text: str  # text that became final this step
    finished: bool  # no more deltas will follow for this sample
    finish_reason: str | None = None  # "stop", "length" or "abort" once finished
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[TokenLogprobs] | None = None  # per new token, when asked
    # per prompt token (None for the first), when asked: once, with the first output after the prefill
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_prompt_tokens: int = 0  # prompt length
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_output_tokens: int = 0  # tokens generated so far (this sample)
    metrics: RequestMetrics | None = None  # timings, on the final delta


@dataclass
class RequestMetrics:
    arrival_s: float  # monotonic clock
    first_scheduled_s: float | None  # queue time ends
    first_token_s: float | None  # time to first token ends
    finished_s: float  # end
    num_preemptions: int  # times recomputed
    engine_time_s: float = 0.0  # its share of each step's compute, split by the tokens it had in the step


@dataclass
class Sample:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class GenerationResult:
    """The whole result of one request (what `LLM.generate` returns per prompt)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[Sample] = field(default_factory=list)
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # per prompt token (None first), when asked

    @property
    def text(self) -> str:
        return self.samples[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.samples[0].token_ids

    def add(self, delta: RequestOutput) -> None:
        while len(self.samples) <= delta.index:
            self.samples.append(Sample(len(self.samples), "", [], None))
        s = self.samples[delta.index]
        s.text += delta.new_text
        s.token_ids.extend(delta.new_token_ids)
        if delta.logprobs is not None:
            s.logprobs = (s.logprobs or []) + delta.logprobs
        if delta.finished:
            s.finish_reason, s.stop_reason = delta.finish_reason, delta.stop_reason
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
