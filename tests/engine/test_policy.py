"""Scheduling policies (engine/policy.py) with the real scheduler and KV manager: the registry, VTC's
fairness between tenants (against FCFS, to show the test tells them apart), its counter lift and
preemption order, prefix-cache isolation between tenants, and engine time split by tokens.

Time is counted in steps, never read from a clock: tenant B sends one request every K steps, and
a TTFT is the number of steps from its arrival to the step that samples its first token.
"""

from __future__ import annotations

import itertools

import pytest

from ladle.config import POLICIES, SchedulerConfig
from ladle.engine.kv_manager import KVCacheManager
from ladle.engine.policy import POLICY_NAMES, create_policy
from ladle.engine.request import Request, RequestStatus
from ladle.engine.scheduler import Scheduler
from ladle.errors import LadleError
from ladle.metering.tenants import prefix_cache_salt
from ladle.sample.params import SamplingParams

_ids = itertools.count()


def req(tenant: str, prompt_len: int = 32, max_tokens: int = 16, weight: float = 1.0, **kw) -> Request:
    n = next(_ids)
    prompt = [(n * 7 + j) % 300 + 1 for j in range(prompt_len)]  # distinct prompts: no cache hits
    return Request(f"{tenant}-{n}", prompt, SamplingParams(max_tokens=max_tokens), tenant=tenant, weight=weight,
                   max_total_tokens=100_000, arrival_s=float(n), **kw)  # fmt: skip


def make(policy: str, num_blocks: int = 4096, block_size: int = 16, **cfg) -> Scheduler:
    cfg = {"max_num_batched_tokens": 512, "max_num_seqs": 16, **cfg}
    return Scheduler(SchedulerConfig(policy=policy, **cfg), KVCacheManager(num_blocks, block_size))


class Sim:
    """Steps a scheduler as the engine would, sampling token 7 wherever a chunk samples."""

    def __init__(self, s: Scheduler):
        self.s = s
        self.step = 0
        self.first_token_step: dict[str, int] = {}
        self.served: dict[str, int] = {}  # tenant → tokens computed (prompt + output positions)

    def run_step(self):
        out = self.s.schedule()
        for chunk in out.chunks:
            r = chunk.request
            samples = chunk.samples
            r.num_computed_tokens += chunk.num_tokens
            self.s.kv.cache_computed_blocks(r)
            self.served[r.tenant] = self.served.get(r.tenant, 0) + chunk.num_tokens
            if samples:
                r.output_token_ids.append(7)
                self.first_token_step.setdefault(r.request_id, self.step)
                if len(r.output_token_ids) >= r.params.max_tokens:
                    self.s.remove(r)
                    r.status = RequestStatus.FINISHED
        self.step += 1
        return out


def p95(values: list[int]) -> int:
    ordered = sorted(values)
    return ordered[round(0.95 * (len(ordered) - 1))]


# -- the registry ------------------------------------------------------------------------------


def test_the_registry_offers_the_configs_policies():
    assert POLICY_NAMES == POLICIES
    assert [create_policy(n).name for n in POLICY_NAMES] == list(POLICIES)
    with pytest.raises(LadleError, match="lifo"):
        create_policy("lifo")


# -- fairness ----------------------------------------------------------------------------------


def flood_and_trickle(policy: str, num_b: int = 40, every_k: int = 5) -> list[int]:
    """Tenant A sends 200 requests at once (outputs of 16..48 tokens); tenant B one request every
    `every_k` steps. Returns B's TTFTs in steps."""
    sim = Sim(make(policy))
    for i in range(200):
        sim.s.add(req("a", max_tokens=16 + (i * 7) % 33))
    arrivals = {}
    while sim.s.has_work() or len(arrivals) < num_b:
        if sim.step % every_k == 0 and len(arrivals) < num_b:
            b = req("b")
            arrivals[b.request_id] = sim.step
            sim.s.add(b)
        sim.run_step()
        assert sim.step < 5000
    return [sim.first_token_step[rid] - arrived + 1 for rid, arrived in arrivals.items()]


def idle_ttft() -> int:
    sim = Sim(make("vtc"))
    b = req("b")
    sim.s.add(b)
    while b.request_id not in sim.first_token_step:
        sim.run_step()
    return sim.first_token_step[b.request_id] + 1


def test_vtc_keeps_a_light_tenants_ttft_near_idle_beside_a_flood_and_fcfs_does_not():
    idle = idle_ttft()
    assert idle == 1  # the prompt fits one step
    vtc, fcfs = flood_and_trickle("vtc"), flood_and_trickle("fcfs")
    assert p95(vtc) <= 3 * idle
    assert p95(fcfs) > 30 * idle  # FCFS queues B behind A's flood: the test tells the policies apart


def test_backlogged_tenants_share_tokens_by_their_weights():
    def split(policy):
        sim = Sim(make(policy))
        for i in range(200):
            sim.s.add(req("a", max_tokens=16 + (i * 7) % 33, weight=1.0))
            sim.s.add(req("b", max_tokens=16 + (i * 5) % 33, weight=3.0))
        while {r.tenant for r in sim.s.waiting} == {"a", "b"}:  # both backlogged
            sim.run_step()
        assert sim.step > 100
        return sim.served.get("b", 0) / sim.served.get("a", 1), sim.s.num_preemptions

    ratio, num_preemptions = split("vtc")
    assert ratio == pytest.approx(3.0, rel=0.10)
    assert num_preemptions <= 5  # two busy tenants do not preempt each other back and forth
    fcfs_ratio, _ = split("fcfs")
    assert fcfs_ratio == pytest.approx(1.0, rel=0.10)  # FCFS serves by arrival (interleaved): weights unseen


def test_with_one_tenant_vtc_schedules_exactly_as_fcfs():
    """Same requests, a cache small enough to preempt: every step's chunks and preemptions agree."""

    def fresh(i: int, prompt_len: int, max_tokens: int) -> Request:
        prompt = [(i * 7 + j) % 300 + 1 for j in range(prompt_len)]
        params = SamplingParams(max_tokens=max_tokens)
        return Request(f"r{i}", prompt, params, max_total_tokens=1000, arrival_s=float(i))

    sims = {}
    for policy in ("fcfs", "vtc"):
        sim = Sim(make(policy, num_blocks=24, block_size=4, max_num_batched_tokens=48, max_num_seqs=6))
        for i in range(30):
            sim.s.add(fresh(i, 5 + (i * 3) % 17, 4 + (i * 5) % 13))
        trace = []
        while sim.s.has_work():
            if sim.step == 7:  # a late arrival joins the queue mid-run
                sim.s.add(fresh(30, 9, 6))
            out = sim.run_step()
            trace.append(([(c.request.request_id, c.num_tokens) for c in out.chunks],
                          [r.request_id for r in out.preempted]))  # fmt: skip
            assert sim.step < 2000
        sims[policy] = (trace, sim.s.num_preemptions)
    assert sims["fcfs"][1] > 0, "the cache was meant to be too small"
    assert sims["vtc"] == sims["fcfs"]


# -- VTC's counters ----------------------------------------------------------------------------


def test_a_tenant_back_from_idle_is_lifted_to_the_least_active_counter_and_counters_are_forgotten():
    sim = Sim(make("vtc"))
    vtc = sim.s.policy
    first = req("a", max_tokens=2)
    sim.s.add(first)
    while sim.s.has_work():
        sim.run_step()
    assert vtc.counters == {} and vtc.num_active == {}  # nobody in the system: nothing kept
    a, c = req("a", max_tokens=50), req("c", max_tokens=50)
    sim.s.add(a)
    sim.s.add(c)
    for _ in range(10):
        sim.run_step()
    assert vtc.counter("a") == vtc.counter("c") == (31 + 2 * 10) / 1.0  # 31 prompt, 10 sampled positions
    vtc.counters["c"] += 100.0  # c has been served more
    b = req("b")
    sim.s.add(b)
    assert vtc.counter("b") == vtc.counter("a")  # lifted to the least active counter: no credit for idling


def test_under_kv_pressure_vtc_preempts_the_most_served_tenants_newest_request():
    s = make("vtc", num_blocks=12, block_size=4, max_num_batched_tokens=64)  # 48 token slots
    sim = Sim(s)
    light = req("light", prompt_len=8, max_tokens=30)
    heavy = [req("heavy", prompt_len=8, max_tokens=30) for _ in range(2)]
    for r in (light, *heavy):
        s.add(r)
    s.policy.counters["heavy"] = 1000.0  # heavy has been served far more
    preempted = []
    while s.has_work() and not preempted:
        preempted = sim.run_step().preempted
    assert preempted and preempted[0] is heavy[1]  # the most-served tenant's newest, not the newest overall
    assert light.status == RequestStatus.RUNNING


def test_an_interactive_request_preempts_a_batch_one_under_vtc():
    s = make("vtc", max_num_seqs=2)
    sim = Sim(s)
    batch = [req("bulk", max_tokens=30, priority=1) for _ in range(2)]
    for r in batch:
        s.add(r)
    sim.run_step()
    urgent = req("bulk2", max_tokens=4, priority=0)
    s.add(urgent)
    out = sim.run_step()
    assert urgent in [c.request for c in out.chunks] and out.preempted == [batch[1]]


# -- prefix-cache isolation ----------------------------------------------------------------------


@pytest.mark.parametrize("share", [False, True])
def test_tenants_never_hit_each_others_prefix_cache_unless_shared(share):
    s = make("vtc", block_size=4)
    sim = Sim(s)
    prompt = list(range(1, 34))

    def run(tenant: str) -> Request:
        r = Request(f"{tenant}-{next(_ids)}", prompt, SamplingParams(max_tokens=1), tenant=tenant,
                    cache_salt=prefix_cache_salt(tenant, None, share), max_total_tokens=1000)  # fmt: skip
        s.add(r)
        while s.has_work():
            sim.run_step()
        return r

    assert run("a").num_cached_tokens == 0
    assert run("a").num_cached_tokens == 32  # the same tenant hits its own prompt
    assert run("b").num_cached_tokens == (32 if share else 0)


def test_the_prefix_cache_salt_keeps_the_default_tenant_unsalted():
    assert prefix_cache_salt("default", None, share=False) is None  # as before tenants existed
    assert prefix_cache_salt("default", "x", share=False) == "x"
    assert prefix_cache_salt("team-a", None, share=False) != prefix_cache_salt("team-b", None, share=False)
    assert prefix_cache_salt("team-a", "x", share=False) != prefix_cache_salt("team-a", "y", share=False)
    assert prefix_cache_salt("team-a", "x", share=True) == "x"


# -- engine time ----------------------------------------------------------------------------------


def test_engine_time_splits_each_step_by_tokens(tiny_models):
    from ladle.engine.llm import LLM

    llm = LLM(str(tiny_models["qwen2"].hf_dir), dtype="float32", device="cpu", kv_cache_memory_gib=0.05)
    eng = llm.engine
    ticks = itertools.count()
    eng.clock = lambda: float(next(ticks))  # every step's compute takes 1.0 "second" (two clock reads)
    steps: list[dict[str, int]] = []
    run = eng.executor.execute_step

    def recording(batch):
        steps.append({r.request_id: len(r.token_ids) for r in batch.requests})
        return run(batch)

    eng.executor.execute_step = recording
    for i, (n, length) in enumerate([(1, 7), (2, 19), (1, 40)]):
        params = SamplingParams(temperature=0.8, seed=i, max_tokens=5 + i, n=n, ignore_eos=True)
        eng.add_request(f"q{i}", [3 + (i + j) % 200 for j in range(length)], params)
    finals = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                finals[(out.request_id, out.index)] = out.metrics.engine_time_s
    expected: dict[str, float] = {}
    for tokens in steps:
        total = sum(tokens.values())
        for rid, num in tokens.items():
            expected[rid] = expected.get(rid, 0.0) + num / total
    by_internal = {("q1", 0): "q1#0", ("q1", 1): "q1#1"}
    assert len(finals) == 4  # the two samples of q1 each have their own
    for key, got in finals.items():
        assert got == pytest.approx(expected[by_internal.get(key, key[0])])
    assert sum(finals.values()) == pytest.approx(len(steps))  # the shares add up to the steps' time
