"""The engine core: requests in, one scheduled step at a time, token deltas out.

Plain Python: tensors stay in the executor (the model runner) it is given. Not thread-safe: one
thread drives it (the caller of `LLM.generate`, or the async engine's loop thread). A loop thread
claims the engine (`claim`); while it holds it, a call from any other thread that would change
the engine's state fails at once with `EngineOwnershipError` instead of racing the loop for
requests and outputs.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, replace

from ladle.config import EngineConfig
from ladle.engine.detokenizer import IncrementalDetokenizer
from ladle.engine.kv_manager import KVCacheManager
from ladle.engine.outputs import RequestMetrics, RequestOutput
from ladle.engine.request import FinishReason, Request, RequestStatus
from ladle.engine.scheduler import ScheduledChunk, Scheduler
from ladle.engine.speculative import DraftProposer, NgramProposer, SpeculationPolicy
from ladle.errors import InvalidRequestError, LadleError
from ladle.model.tokenizer import Tokenizer
from ladle.runner.step import SampleSpec, StepBatch, StepRequest, StepResult, TokenLogprobs
from ladle.sample.grammar import GrammarCompiler
from ladle.sample.params import SamplingParams


@dataclass(frozen=True)
class EngineInfo:
    """What the engine serves, for logs, /v1/models and metrics."""

    model_name: str  # the name requests use
    dtype: str  # weights and KV cache, e.g. "float32"
    device: str  # "cpu", "cuda:0", ...
    max_model_len: int  # prompt + output tokens at most
    num_kv_blocks: int  # KV-cache blocks
    block_size: int  # tokens per block
    attention_backend: str  # attention implementation in use
    quantization: str = "none"  # weight-only quantization of the decoder layers
    weight_bytes: int = 0  # the model's parameters and buffers (draft model included)
    kv_cache_bytes: int = 0  # the KV cache's tensors

    @property
    def weights_description(self) -> str:
        if self.quantization == "none":
            return self.dtype
        if self.quantization == "w8a8":  # the products run on int8 activations; the rest in the dtype
            return f"int8 weights and activations (w8a8), {self.dtype} elsewhere"
        return f"{self.quantization} weights, {self.dtype} activations"

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size


@dataclass
class EngineStats:
    """Counters since start and gauges now; the metrics exporter reads these."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # share of KV blocks held by requests
    num_kv_blocks: int = 0
    num_steps: int = 0
    num_prompt_tokens: int = 0  # prompt tokens of admitted requests
    num_computed_tokens: int = 0  # tokens run through the model (prompts, recomputation, decodes)
    num_generated_tokens: int = 0
    num_finished: int = 0  # requests (samples) finished, aborted ones included
    num_preemptions: int = 0
    prefix_queried_blocks: int = 0
    prefix_hit_blocks: int = 0
    spec_num_drafts: int = 0  # steps of a request that carried guesses
    spec_num_draft_tokens: int = 0  # guesses verified
    spec_num_accepted_tokens: int = 0  # guesses the model agreed with

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_blocks / self.prefix_queried_blocks if self.prefix_queried_blocks else 0.0

    @property
    def spec_acceptance_rate(self) -> float:
        return self.spec_num_accepted_tokens / self.spec_num_draft_tokens if self.spec_num_draft_tokens else 0.0

    @property
    def spec_mean_accepted_length(self) -> float:
        """Tokens a speculating request gains per step: its accepted guesses plus the one it samples."""
        return 1.0 + self.spec_num_accepted_tokens / self.spec_num_drafts if self.spec_num_drafts else 0.0


class EngineOwnershipError(LadleError):
    """A thread other than the one that claimed the engine tried to drive it."""


class EngineCore:
    def __init__(
        self,
        config: EngineConfig,
        executor,
        tokenizer: Tokenizer,
        max_model_len: int,
        num_blocks: int,
        model_name: str = "",
        info: EngineInfo | None = None,
        vocab_size: int | None = None,
    ):
        self.config = config
        self.executor = executor  # has execute_step(StepBatch) -> StepResult
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.model_name = model_name
        self.info = info or EngineInfo(model_name, "?", "?", max_model_len, num_blocks, config.cache.block_size, "?")
        self.kv = KVCacheManager(
            num_blocks, config.cache.block_size, config.cache.enable_prefix_caching, cache_namespace=model_name
        )
        self.scheduler = Scheduler(config.scheduler, self.kv)
        # constraints compiled for this tokenizer, over the model's logits width
        self.grammars = GrammarCompiler(tokenizer.backend, vocab_size or tokenizer.vocab_size, tokenizer.stop_token_ids)
        self.groups: dict[str, list[Request]] = {}  # caller's request id → its samples
        self.group_of: dict[str, str] = {}  # internal id → caller's id
        self.index_of: dict[str, int] = {}  # internal id → sample index
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.pending_forks: dict[str, list[Request]] = {}  # first sample's id → samples waiting to share its prompt
        self.pending_outputs: list[RequestOutput] = []  # aborts, reported by the next step
        self.stats = EngineStats(num_kv_blocks=num_blocks)
        self.clock = time.perf_counter  # times each step's compute (a test may give a fake one)
        self._owner: tuple[int, str] | None = None  # (thread id, who) of the thread that drives the engine
        # seeds for sampled requests that bring none: every draw then comes from (seed, position),
        # so a draft model's guesses and the verification share their uniforms
        self._seeds = random.Random(config.seed)
        spec = config.speculative
        self.spec_policy = SpeculationPolicy(spec)
        self.proposer = None
        if spec.method == "ngram":
            self.proposer = NgramProposer(spec)
        elif spec.method == "draft":
            self.proposer = DraftProposer(spec, executor, self.kv)

    # -- which thread drives it --------------------------------------------------------------------

    def claim(self, owner: str) -> None:
        """Make the calling thread the only one that may add, abort or step (`owner` names it in errors)."""
        self._check_thread()
        self._owner = (threading.get_ident(), owner)

    def release(self) -> None:
        if self._owner is not None and self._owner[0] == threading.get_ident():
            self._owner = None

    def _check_thread(self) -> None:
        owner = self._owner
        if owner is not None and owner[0] != threading.get_ident():
            raise EngineOwnershipError(
                f"this engine is driven by {owner[1]} (thread {owner[0]}); a second thread may not add, abort "
                "or step requests on it. Send requests through that driver (AsyncEngine.generate), or build "
                "another engine for this thread (LLM(..., loaded=...) shares the weights)."
            )

    # -- requests ------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
        arrival_s: float | None = None,
        deadline_s: float | None = None,
        tenant: str = "default",
        weight: float = 1.0,
    ) -> None:
        """Queue a request; with deadline_s (monotonic), one not started by then ends with finish
        reason "timeout" and no tokens."""
        self._check_thread()
        self.validate(prompt_token_ids, params)
        if request_id in self.groups:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        if params.seed is None and not params.is_greedy:
            params = replace(params, seed=self._seeds.getrandbits(62))
        arrival = time.monotonic() if arrival_s is None else arrival_s
        grammar = self.grammars.compile(params.structured) if params.structured is not None else None
        samples = []
        for i in range(params.n):
            rid = request_id if params.n == 1 else f"{request_id}#{i}"
            samples.append(
                Request(
                    rid,
                    list(prompt_token_ids),
                    params.for_sample(i),
                    eos_token_ids=self.tokenizer.stop_token_ids,
                    priority=priority,
                    cache_salt=cache_salt,
                    tenant=tenant,
                    weight=weight,
                    max_total_tokens=self.max_model_len,
                    arrival_s=arrival,
                    parent_id=samples[0].request_id if i else None,
                    deadline_s=deadline_s,
                    matcher=grammar.deep_copy() if grammar is not None else None,
                )
            )
            self.group_of[rid], self.index_of[rid] = request_id, i
            self.detokenizers[rid] = IncrementalDetokenizer(self.tokenizer.backend, samples[-1].params)
        self.groups[request_id] = samples
        self.stats.num_prompt_tokens += len(prompt_token_ids) * params.n
        first = samples[0]
        if len(samples) > 1:  # the others wait for the first one's prompt, then share its blocks
            first.num_forks_pending = len(samples) - 1
            self.pending_forks[first.request_id] = samples[1:]
        self.scheduler.add(first)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty: give at least one token", param="prompt")
        self.tokenizer.validate_ids(prompt_token_ids)
        params.check_vocab(self.tokenizer.vocab_size)
        n, limit = len(prompt_token_ids), self.max_model_len
        if n >= limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens, and the prompt has {n} tokens "
                f"(at least one token must be left to generate).",
                param="prompt",
            )
        if params.max_tokens is not None and n + params.max_tokens > limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} in the completion). "
                f"Please reduce the prompt or max_tokens.",
                param="max_tokens",
            )

    def abort(self, request_id: str) -> None:
        """End every sample of the request; the final deltas come with the next step."""
        self._check_thread()
        for request in self.groups.get(request_id, []):
            if not request.is_finished:
                self._finish(request, FinishReason.ABORT)
                self.pending_outputs.append(self._output(request, [], None))
        self._forget_group(request_id)

    def _expire_waiting(self) -> None:
        """End the requests still waiting, never started, at their deadline (all their samples)."""
        now = time.monotonic()
        expired = {
            self.group_of[r.request_id]
            for r in self.scheduler.waiting
            if r.deadline_s is not None and now >= r.deadline_s and r.first_scheduled_s is None
        }
        for group_id in expired:
            samples = self.groups.get(group_id, [])
            if any(r.first_scheduled_s is not None for r in samples):
                continue  # a sample is computing: the request is being served
            for request in samples:
                if not request.is_finished:
                    self._finish(request, FinishReason.TIMEOUT)
                    self.pending_outputs.append(self._output(request, [], None))
            self._forget_group(group_id)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix block (the blocks of running requests stay theirs)."""
        self._check_thread()
        self.kv.reset_prefix_cache()

    def has_unfinished(self) -> bool:
        return bool(self.groups) or bool(self.pending_outputs)

    # -- one step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        self._check_thread()
        self._expire_waiting()
        outputs, self.pending_outputs = self.pending_outputs, []
        sched = self.scheduler.schedule()
        if sched.is_empty:
            self._update_gauges()
            return outputs
        # a request with max_tokens 0 (it scores its prompt) ends with its prefill: nothing to sample
        ends = [c.samples for c in sched.chunks]  # the chunk reaches the request's last token
        samples = [e and c.request.params.max_tokens != 0 for c, e in zip(sched.chunks, ends, strict=True)]
        batch = StepBatch([self._step_request(c, s) for c, s in zip(sched.chunks, samples, strict=True)])
        started = self.clock()
        result: StepResult = self.executor.execute_step(batch)
        self._charge_engine_time(sched.chunks, self.clock() - started, sched.num_batched_tokens)
        k = 0
        for chunk, sampled, ended, asked in zip(sched.chunks, samples, ends, batch.requests, strict=True):
            request = chunk.request
            self.stats.num_computed_tokens += chunk.num_tokens
            request.spec_token_ids = []
            if request.needs_prompt_logprobs:
                self._add_prompt_logprobs(request, asked.num_computed, result.prompt_logprobs.get(asked.request_id, []))
            if not sampled:
                request.num_computed_tokens += chunk.num_tokens
                self.kv.cache_computed_blocks(request)
                if ended:  # max_tokens 0: the prompt is done, and so is the request
                    self._finish(request, FinishReason.LENGTH)
                    outputs.append(self._output(request, [], None))
                    self._maybe_forget_group(request)
                continue
            tokens, logprobs = result.sampled_token_ids[k], result.logprobs[k]
            k += 1
            accepted = len(tokens) - 1  # guesses the model agreed with (their K/V is now valid)
            request.num_computed_tokens += chunk.num_tokens - chunk.num_spec + accepted
            if chunk.num_spec:
                self._count_verified(request, chunk.num_spec, accepted)
            if request.num_forks_pending:
                self._fork(request)
            outputs.append(self._on_tokens(request, tokens, logprobs))
            self.kv.cache_computed_blocks(request)  # after the accepted guesses joined the output
        self.stats.num_steps += 1
        if self.proposer is not None:
            self._propose()
        self._update_gauges()
        return [o for o in outputs if o is not None]

    @staticmethod
    def _charge_engine_time(chunks: list[ScheduledChunk], duration_s: float, num_tokens: int) -> None:
        """Split a step's compute among its requests by the tokens each had in it."""
        for chunk in chunks:
            chunk.request.engine_time_s += duration_s * chunk.num_tokens / num_tokens

    def _count_verified(self, request: Request, num_spec: int, accepted: int) -> None:
        s = self.stats
        s.spec_num_drafts += 1
        s.spec_num_draft_tokens += num_spec
        s.spec_num_accepted_tokens += accepted
        self.proposer.on_verified(request, num_spec, accepted)

    def _propose(self) -> None:
        """Guesses for the next step, for the decoding requests the policy lets speculate."""
        running = self.scheduler.running
        ks = [self.spec_policy.num_tokens(r, len(running)) for r in running]
        chosen = [(r, k) for r, k in zip(running, ks, strict=True) if k > 0]
        if not chosen:
            return
        proposals = self.proposer.propose([r for r, _ in chosen], [k for _, k in chosen])
        for (request, _), guesses in zip(chosen, proposals, strict=True):
            if request.matcher is not None and guesses:  # the grammar's prefix of them: the rest would fail
                guesses = guesses[: request.matcher.validate_tokens(guesses)]
            request.spec_token_ids = guesses

    def _step_request(self, chunk: ScheduledChunk, samples: bool) -> StepRequest:
        r = chunk.request
        start = r.num_computed_tokens
        end = start + chunk.num_tokens - chunk.num_spec
        guesses = r.spec_token_ids[: chunk.num_spec]
        specs = []
        if samples:  # one per position that samples: after the last token and after each guess
            specs = [self._sample_spec(r, guesses[:j]) for j in range(chunk.num_spec + 1)]
        step = StepRequest(r.request_id, r.tokens(start, end) + guesses, start, chunk.block_ids, specs, chunk.num_spec)
        if r.needs_prompt_logprobs:  # the prompt tokens after the chunk's positions (the last one has none)
            step.prompt_targets = r.prompt_token_ids[start + 1 : min(end, r.num_prompt_tokens - 1) + 1]
            step.prompt_logprobs = r.params.prompt_logprobs
        return step

    @staticmethod
    def _add_prompt_logprobs(request: Request, start: int, entries: list[TokenLogprobs]) -> None:
        """File a chunk's prompt logprobs (its first position is prompt token `start`): entry i is that
        of token start + 1 + i. A prompt recomputed after a preemption overwrites its earlier ones."""
        filed = request.prompt_logprobs
        del filed[start + 1 :]
        if not filed:
            filed.append(None)  # the first token has nothing before it
        filed.extend(entries)

    @staticmethod
    def _sample_spec(r: Request, guesses: list[int]) -> SampleSpec:
        """How to sample the token after the request's tokens and the given guesses. A grammar
        decides where its output may end: min_tokens does not hold its end back."""
        output = r.output_token_ids + guesses if guesses else r.output_token_ids
        suppressed = ()
        if len(output) < r.params.min_tokens and r.matcher is None:
            suppressed = tuple(r.params.stop_token_ids) + (() if r.params.ignore_eos else r.eos_token_ids)
        return SampleSpec(r.params, r.prompt_token_ids, output, suppressed, r.matcher, guesses)

    def _on_tokens(
        self, request: Request, tokens: list[int], logprobs: list[TokenLogprobs] | None
    ) -> RequestOutput | None:
        """Append the step's tokens one by one until one ends the request; one delta for all of them."""
        if request.is_finished:
            return None
        if request.first_token_s is None:
            request.first_token_s = time.monotonic()
        params = request.params
        detok = self.detokenizers[request.request_id]
        taken = 0
        for token in tokens:
            request.output_token_ids.append(token)
            taken += 1
            num_out = len(request.output_token_ids)
            if request.matcher is not None:
                request.matcher.consume_token(token)
            if token in params.stop_token_ids or (not params.ignore_eos and token in request.eos_token_ids):
                stop_token = token if token in params.stop_token_ids else None
                self._finish(request, FinishReason.STOP, stop_reason=stop_token)
            elif request.matcher is not None and request.matcher.is_stopped():  # the grammar is complete
                detok.add_token(token, check_stops=False)
                self._finish(request, FinishReason.STOP)
            elif detok.add_token(token, check_stops=num_out >= params.min_tokens):
                self._finish(request, FinishReason.STOP, stop_reason=detok.stop_reason)
            elif num_out >= request.max_output_tokens:
                self._finish(request, FinishReason.LENGTH)
            if request.is_finished:
                break
        self.stats.num_generated_tokens += taken
        out = self._output(request, tokens[:taken], logprobs[:taken] if logprobs is not None else None)
        if request.is_finished:
            self._maybe_forget_group(request)
        return out

    def _output(self, request: Request, tokens: list[int], logprobs) -> RequestOutput:
        detok = self.detokenizers[request.request_id]
        finished = request.is_finished
        metrics = None
        if finished:
            metrics = RequestMetrics(
                request.arrival_s,
                request.first_scheduled_s,
                request.first_token_s,
                time.monotonic(),
                request.num_preemptions,
                request.engine_time_s,
            )
        return RequestOutput(
            request_id=self.group_of[request.request_id],
            index=self.index_of[request.request_id],
            new_token_ids=tokens,
            new_text=detok.take_delta(finished),
            finished=finished,
            finish_reason=request.finish_reason.value if finished else None,
            stop_reason=request.stop_reason,
            logprobs=logprobs,
            prompt_logprobs=self._take_prompt_logprobs(request),
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=max(request.num_cached_tokens, 0),
            num_output_tokens=len(request.output_token_ids),
            metrics=metrics,
        )

    @staticmethod
    def _take_prompt_logprobs(request: Request) -> list[TokenLogprobs | None] | None:
        """The prompt's logprobs, once all computed, with the first output that follows."""
        if request.params.prompt_logprobs is None or request.prompt_logprobs_reported or request.needs_prompt_logprobs:
            return None
        request.prompt_logprobs_reported = True
        return request.prompt_logprobs

    def _finish(self, request: Request, reason: FinishReason, stop_reason=None) -> None:
        if request.status != RequestStatus.FINISHED:
            # what it computed stays findable: one that ends in the step of its last prefill chunk
            # (max_tokens 1, a scoring request) files that chunk here, before its blocks are freed
            self.kv.cache_computed_blocks(request)
            self.scheduler.remove(request)
            self.stats.num_finished += 1
        request.status, request.finish_reason, request.stop_reason = RequestStatus.FINISHED, reason, stop_reason
        for child in self.pending_forks.pop(request.request_id, []):  # never forked: nobody to share with
            self.scheduler.add(child)

    def _fork(self, parent: Request) -> None:
        for child in self.pending_forks.pop(parent.request_id, []):
            child.num_computed_tokens = self.kv.fork(parent, child)
            child.num_cached_tokens = child.num_computed_tokens
            child.prompt_logprobs = list(parent.prompt_logprobs)  # the same prompt: computed once
            self.scheduler.add(child, front=True)
        parent.num_forks_pending = 0

    def _maybe_forget_group(self, request: Request) -> None:
        group_id = self.group_of[request.request_id]
        if all(r.is_finished for r in self.groups.get(group_id, [])):
            self._forget_group(group_id)

    def _forget_group(self, group_id: str) -> None:
        for r in self.groups.pop(group_id, []):
            self.group_of.pop(r.request_id, None)
            self.index_of.pop(r.request_id, None)
            self.detokenizers.pop(r.request_id, None)
            self.pending_forks.pop(r.request_id, None)
            if self.proposer is not None:
                self.proposer.drop(r.request_id)

    def _update_gauges(self) -> None:
        s = self.stats
        s.num_running, s.num_waiting = self.scheduler.num_running, self.scheduler.num_waiting
        s.kv_usage = self.kv.usage
        s.num_preemptions = self.scheduler.num_preemptions
        s.prefix_queried_blocks = self.kv.stats.num_queried_blocks
        s.prefix_hit_blocks = self.kv.stats.num_hit_blocks
