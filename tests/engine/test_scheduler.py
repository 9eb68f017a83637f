"""The scheduler alone: budgets, decode-first ordering, chunked prefill, preemption, priorities.

The model is left out: a step's result is simulated by advancing each request by the tokens it
was scheduled and, where the chunk samples, appending a token.
"""

from __future__ import annotations

import itertools

import pytest

from ladle.config import SchedulerConfig
from ladle.engine.kv_manager import KVCacheManager
from ladle.engine.request import Request, RequestStatus
from ladle.engine.scheduler import Scheduler
from ladle.errors import LadleError
from ladle.sample.params import SamplingParams

_ids = itertools.count()


def req(prompt_len: int, max_tokens: int = 4, priority: int = 0, arrival: float | None = None) -> Request:
    n = next(_ids)
    return Request(
        f"r{n}",
        [n % 50 + 1] * prompt_len,
        SamplingParams(max_tokens=max_tokens),
        priority=priority,
        max_total_tokens=100_000,
        arrival_s=float(n) if arrival is None else arrival,
    )


def make(num_blocks=64, block_size=4, **cfg) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), KVCacheManager(num_blocks, block_size))


def advance(s: Scheduler, out) -> list[Request]:
    """Apply a step's effect; returns requests that finished."""
    done = []
    for chunk in out.chunks:
        r = chunk.request
        samples = chunk.samples
        r.num_computed_tokens += chunk.num_tokens
        s.kv.cache_computed_blocks(r)
        if samples:
            r.output_token_ids.append(7)
            if len(r.output_token_ids) >= r.params.max_tokens:
                s.remove(r)
                r.status = RequestStatus.FINISHED
                done.append(r)
    return done


def run_to_completion(s: Scheduler, max_steps=10_000):
    steps = []
    for _ in range(max_steps):
        if not s.has_work():
            return steps
        out = s.schedule()
        assert out.num_batched_tokens <= s.config.max_num_batched_tokens
        assert len(s.running) <= s.config.max_num_seqs
        steps.append(out)
        advance(s, out)
    raise AssertionError("did not finish: deadlock or livelock")


def test_decodes_come_before_prefill_chunks_and_a_long_prompt_is_chunked():
    s = make(num_blocks=256, max_num_batched_tokens=64)
    short = [req(8, max_tokens=20) for _ in range(3)]
    for r in short:
        s.add(r)
    advance(s, s.schedule())  # the three short prompts prefill together
    long = req(500, max_tokens=2)
    s.add(long)
    for _ in range(5):  # while the long prompt prefills, every step still decodes the three
        out = s.schedule()
        sizes = {c.request.request_id: c.num_tokens for c in out.chunks}
        assert all(sizes[r.request_id] == 1 for r in short)
        assert out.chunks[-1].request is long and sizes[long.request_id] == 61
        advance(s, out)
    assert long.num_computed_tokens == 5 * 61


def test_budget_and_sequence_cap():
    s = make(num_blocks=512, max_num_batched_tokens=100, max_num_seqs=3)
    for _ in range(6):
        s.add(req(40))
    out = s.schedule()
    assert [c.num_tokens for c in out.chunks] == [40, 40, 20]  # the third prompt gets a chunk
    assert s.num_waiting == 3


def test_preemption_frees_the_newest_and_everything_finishes():
    s = make(num_blocks=12, block_size=4, max_num_batched_tokens=64)  # 48 token slots
    requests = [req(10, max_tokens=12) for _ in range(6)]  # 22 tokens each at the end
    for r in requests:
        s.add(r)
    num_preempted = 0
    for _ in range(1000):
        if not s.has_work():
            break
        running_before = list(s.running)
        out = s.schedule()
        if out.preempted and running_before:
            assert out.preempted[0] is max(running_before, key=lambda r: r.arrival_s)  # FCFS: the newest
        num_preempted += len(out.preempted)
        advance(s, out)
    assert num_preempted > 0, "the cache was meant to be too small"
    assert all(len(r.output_token_ids) == 12 for r in requests)
    assert s.kv.num_free_blocks == 12


def test_priority_policy_serves_lower_values_first_and_preempts_for_them():
    s = make(num_blocks=8, block_size=4, max_num_batched_tokens=64, policy="priority")  # 32 slots
    low = [req(12, max_tokens=8, priority=5) for _ in range(2)]
    for r in low:
        s.add(r)
    advance(s, s.schedule())
    urgent = req(12, max_tokens=4, priority=0)
    s.add(urgent)
    out = s.schedule()
    assert urgent in [c.request for c in out.chunks]
    assert out.preempted and all(r.priority == 5 for r in out.preempted)
    run_to_completion(s)
    assert s.kv.num_free_blocks == 8


def test_a_waiting_request_with_a_cached_prefix_computes_only_the_rest():
    s = make(num_blocks=64, block_size=4)
    a = req(17, max_tokens=1)
    s.add(a)
    run_to_completion(s)
    b = Request("b", list(a.prompt_token_ids), SamplingParams(max_tokens=1), max_total_tokens=1000)
    s.add(b)
    out = s.schedule()
    assert out.chunks[0].num_tokens == 1 and b.num_cached_tokens == 16


def test_chunked_prefill_off_waits_for_a_budget_that_fits():
    s = make(num_blocks=256, max_num_batched_tokens=32, enable_chunked_prefill=False)
    s.add(req(20))
    s.add(req(20))
    out = s.schedule()
    assert [c.num_tokens for c in out.chunks] == [20]


def test_bad_config_values_are_named():
    with pytest.raises(LadleError, match="policy"):
        SchedulerConfig(policy="lifo")
    with pytest.raises(LadleError, match="--max-num-seqs"):
        SchedulerConfig(max_num_seqs=0)
