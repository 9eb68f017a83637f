"""Continuous batching: every step, decide which requests compute how many tokens.

Each step has a token budget (`max_num_batched_tokens`) and a cap on running requests
(`max_num_seqs`). Running requests come first, decodes before prefill chunks, so a long prompt
never freezes the streams of others; then waiting requests are admitted while budget, sequence
slots and KV blocks last, a prompt that does not fit in the budget computing in chunks over
several steps. When the KV cache runs out, a running request is preempted: its blocks are freed
and it goes back to the queue to be recomputed later. Which waiting request goes first, which
running one gives way and whether a newcomer may preempt is the policy's call (engine/policy.py:
fcfs, priority, vtc); the scheduler tells it what each step computed.

The output of a step is, per request, the number of tokens to compute: prefill, chunked prefill
and decode look the same. A decode that carries speculative guesses (`request.spec_token_ids`)
computes its last token and the guesses in one chunk; the guesses get blocks and budget only when
they are free (a guess never preempts anyone: it is dropped instead).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from ladle.config import SchedulerConfig
from ladle.engine.kv_manager import CachedPrefix, KVCacheManager
from ladle.engine.policy import create_policy
from ladle.engine.request import Request, RequestStatus


@dataclass
class ScheduledChunk:
    request: Request  # who computes
    num_tokens: int  # how many of its tokens, from request.num_computed_tokens on
    block_ids: list[int]  # its block table after allocation
    num_spec: int = 0  # of num_tokens, speculative guesses after the request's last token

    @property
    def samples(self) -> bool:
        """The chunk reaches the request's last known token, so the step samples its next one."""
        return self.request.num_computed_tokens + self.num_tokens - self.num_spec == self.request.num_tokens

    @property
    def num_output_tokens(self) -> int:
        """Positions of the chunk that sample a token: the last one and each guess (0: a prefill chunk)."""
        return self.num_spec + 1 if self.samples else 0

    @property
    def num_prompt_tokens(self) -> int:
        """Positions computed to fill the cache only: prompt, or outputs recomputed after a preemption."""
        return self.num_tokens - self.num_output_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)  # in scheduling order
    preempted: list[Request] = field(default_factory=list)  # lost their blocks this step
    num_batched_tokens: int = 0  # sum of chunk sizes

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.policy = create_policy(config.policy)
        self._in_system: set[str] = set()  # ids added and not yet removed (the policy hears each once)

    # -- queue ---------------------------------------------------------------------------------

    def add(self, request: Request, front: bool = False) -> None:
        request.status = RequestStatus.WAITING
        if request.request_id not in self._in_system:
            self._in_system.add(request.request_id)
            self.policy.on_arrival(request)
        if front:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out of the queues (finished or aborted) and free its blocks."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.forget(request)
        if request.request_id in self._in_system:
            self._in_system.discard(request.request_id)
            self.policy.on_finished(request)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, ScheduledChunk] = {}
        # running requests: decodes first, then the prefills under way
        decodes = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        prefills = [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        for request in decodes + prefills:
            if request.status != RequestStatus.RUNNING or budget <= 0:
                continue  # preempted earlier in this loop, or out of budget
            num = min(request.num_tokens - request.num_computed_tokens, budget)
            num_spec = self._fit_guesses(request, budget) if num == 1 else 0
            if not self._allocate_or_preempt(request, num + num_spec, scheduled, out):
                continue
            budget -= num + num_spec
            chunk = ScheduledChunk(request, num + num_spec, self.kv.block_ids(request.request_id), num_spec)
            scheduled[request.request_id] = chunk
        if not out.preempted:  # memory is short: admit nobody new this step
            budget = self._admit_waiting(budget, scheduled, out)
        out.chunks = list(scheduled.values())
        out.num_batched_tokens = sum(c.num_tokens for c in out.chunks)
        self.policy.on_scheduled(out.chunks)
        return out

    def _fit_guesses(self, request: Request, budget: int) -> int:
        """Guesses of a decoding request that fit in the budget and in free blocks (0 if none)."""
        num_spec = min(len(request.spec_token_ids), budget - 1)
        if num_spec > 0 and not self.kv.allocate(request, 1 + num_spec):
            num_spec = 0
        return max(num_spec, 0)

    def _allocate_or_preempt(self, request, num, scheduled, out) -> bool:
        """Allocate blocks for `num` more tokens, preempting others until it fits. False when the
        request itself had to give way."""
        while not self.kv.allocate(request, num):
            victim = self._pick_victim()
            self._preempt(victim, scheduled, out)
            if victim is request:
                return False
        return True

    def _pick_victim(self) -> Request:
        return self.policy.pick_victim(self.running)

    def _preempt(self, victim: Request, scheduled: dict[str, ScheduledChunk], out: SchedulerOutput) -> None:
        self.running.remove(victim)
        scheduled.pop(victim.request_id, None)
        self.kv.free(victim)
        victim.num_computed_tokens = victim.num_draft_computed = 0
        victim.spec_token_ids = []
        victim.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(victim)
        self.add(victim, front=True)

    def _admit_waiting(self, budget: int, scheduled: dict[str, ScheduledChunk], out: SchedulerOutput) -> int:
        for request in self.policy.order(list(self.waiting)):
            if request.status != RequestStatus.WAITING:
                continue  # preempted into the queue during this loop
            if budget <= 0:
                break
            seq_victim = None  # at max_num_seqs: the running request the newcomer would replace
            if len(self.running) >= self.config.max_num_seqs:
                seq_victim = self._seq_victim(request)
                if seq_victim is None:
                    break
            holds_blocks = bool(self.kv.tables.get(request.request_id))  # a fork of a running prompt
            # one that wants its prompt's logprobs computes the whole prompt: no lookup, no wait
            computes_all = holds_blocks or request.needs_prompt_logprobs
            prefix = None if computes_all else self.kv.find_cached_prefix(request)
            if prefix is not None and self.kv.is_prefix_in_flight(request, prefix):
                continue  # its next blocks are being computed by another request: reuse them soon
            computed = request.num_computed_tokens if computes_all else prefix.num_tokens
            num = request.num_tokens - computed
            if num > budget and not self.config.enable_chunked_prefill:
                break
            if seq_victim is not None:
                dropped = scheduled.get(seq_victim.request_id)
                self._preempt(seq_victim, scheduled, out)
                budget += dropped.num_tokens if dropped is not None else 0  # its chunk is not computed
            num = min(num, budget)
            if not self._allocate_for_admission(request, num, prefix, scheduled, out):
                break  # no memory: later arrivals may not overtake it
            self.waiting.remove(request)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = computed
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = computed
            if request.first_scheduled_s is None:
                request.first_scheduled_s = time.monotonic()
            self.running.append(request)
            budget -= num
            scheduled[request.request_id] = ScheduledChunk(request, num, self.kv.block_ids(request.request_id))
        return budget

    def _seq_victim(self, request: Request) -> Request | None:
        """At max_num_seqs: the running request the newcomer may replace, where the policy takes
        sequence slots as well as blocks (vtc: for a tenant served far less); None: it waits."""
        if not self.policy.preempts_for_seqs or not self.running:
            return None
        victim = self._pick_victim()
        return victim if self.policy.may_preempt(request, victim) else None

    def _allocate_for_admission(self, request, num, prefix: CachedPrefix | None, scheduled, out) -> bool:
        """Blocks for a newcomer: it preempts running requests while the policy lets it (the priority
        policy: those of a higher priority value), else it waits for blocks to free up."""
        while not self.kv.allocate(request, num, prefix):
            if not self.running:
                return False
            victim = self._pick_victim()
            if not self.policy.may_preempt(request, victim):
                return False
            self._preempt(victim, scheduled, out)
        return True
