"""Sampling parameters of one request, as OpenAI's and vLLM's APIs name them. Validated once, on
creation: a bad value raises InvalidRequestError naming the parameter."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ladle.errors import InvalidRequestError

MAX_STOP_STRINGS = 16  # stop strings a request may give
MAX_TOP_LOGPROBS = 20  # alternatives per position, as in OpenAI's API
MAX_N = 128  # samples per request
MAX_LOGIT_BIAS = 100.0  # |bias| bound, as in OpenAI's API


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on a request's output text, enforced token by token by a grammar engine
    (llguidance): the output matches it. Hashable, so compiled grammars are cached by it."""

    kind: str  # "json" (a JSON schema), "json_object" (any JSON object), "regex", "choice", "grammar"
    spec: str = ""  # json: the schema as JSON text; regex: the pattern; choice: a JSON list of strings;
    # grammar: a Lark grammar as llguidance reads it (GBNF is converted), `%json {...}` rules included
    param: str = field(default="structured_outputs", compare=False)  # the request field it came from

    KINDS = ("json", "json_object", "regex", "choice", "grammar")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise InvalidRequestError(f"structured output kind must be one of {', '.join(self.KINDS)}, got "
                                      f"{self.kind!r}", param=self.param)  # fmt: skip


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # independent samples of the same prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus: keep the most likely tokens whose mass reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = all
    min_p: float = 0.0  # drop tokens less likely than min_p × the most likely one
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the prompt or output
    frequency_penalty: float = 0.0  # subtracted once per earlier occurrence in the output
    presence_penalty: float = 0.0  # subtracted once if the token occurred in the output
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id → added to its logit
    seed: int | None = None  # same seed, same text, whatever else is in the batch
    max_tokens: int | None = 16  # tokens to generate at most; None = up to the context length; 0 = none:
    # the request ends after its prefill (only with prompt_logprobs: a request that scores its prompt)
    min_tokens: int = 0  # stop tokens are suppressed until this many tokens are out
    stop: tuple[str, ...] = ()  # strings that end the output (not included in it)
    stop_token_ids: tuple[int, ...] = ()  # token ids that end the output, besides EOS
    ignore_eos: bool = False  # keep going past EOS (benchmarks)
    include_stop_str_in_output: bool = False  # keep the matched stop string in the text
    logprobs: int | None = None  # None = none; k = the chosen token's logprob plus the k best
    # None = none; k = per prompt token its logprob plus the k best (vLLM's prompt_logprobs): the request
    # then computes its whole prompt (no prefix-cache hit)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True  # leave control tokens out of the text
    speculative: bool = True  # False: never speculate for this request (when the server does)
    structured: StructuredOutput | None = None  # the output must match this (JSON schema, regex, ...)

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids or ()))
        object.__setattr__(self, "logit_bias", {int(k): float(v) for k, v in (self.logit_bias or {}).items()})
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:  # noqa: C901 - one flat list of independent checks
        def bad(param: str, message: str):
            raise InvalidRequestError(f"{param} {message}", param=param)

        if not 1 <= self.n <= MAX_N:
            bad("n", f"must be between 1 and {MAX_N}, got {self.n}")
        if self.temperature < 0:
            bad("temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            bad("top_k", f"must be -1, 0 (disabled) or a positive count, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            bad("max_tokens", f"must be at least 1 (0 only with prompt logprobs), got {self.max_tokens}")
        if self.min_tokens < 0:
            bad("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if len(self.stop) > MAX_STOP_STRINGS:
            bad("stop", f"allows at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "strings must be non-empty")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            bad("logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            bad("prompt_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}, got {self.prompt_logprobs}")
        if any(abs(v) > MAX_LOGIT_BIAS for v in self.logit_bias.values()):
            bad("logit_bias", f"values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids named by the request must exist in the model's vocabulary."""
        for param, ids in (("logit_bias", self.logit_bias.keys()), ("stop_token_ids", self.stop_token_ids)):
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"{param} names token ids outside the vocabulary (0..{vocab_size - 1}): {bad[:5]}", param=param
                )

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0

    def for_sample(self, index: int) -> SamplingParams:
        """The parameters of the index-th of n samples: one sample each, distinct seeds."""
        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)


@dataclass
class SampleSpec:
    params: SamplingParams  # how to pick the next token
    prompt_token_ids: list[int]  # for the repetition penalty
    output_token_ids: list[int]  # for the penalties (counts of earlier output)
    suppressed_token_ids: tuple[int, ...] = ()  # stop tokens masked while under min_tokens
    matcher: object | None = None  # the request's grammar matcher (llguidance), where it is constrained
    guesses: list[int] = field(default_factory=list)  # speculative guesses ahead of this row, for its mask


@dataclass
class TokenLogprobs:
    logprob: float  # of the sampled token (model distribution, before sampling transforms)
    top: list[tuple[int, float]]  # the k most likely (token id, logprob), best first
