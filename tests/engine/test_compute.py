"""Several engines on one ComputeLoop, and the load an engine measures."""

from __future__ import annotations

import asyncio
import threading

import pytest

from ladle.engine.async_engine import AsyncEngine
from ladle.engine.compute import ComputeLoop
from ladle.engine.llm import LLM
from ladle.engine.load import LoadSnapshot, LoadTracker
from ladle.engine.request import GenerateRequest
from ladle.sample.params import SamplingParams


def tiny_engine(tiny_models, name):
    return LLM(str(tiny_models[name].hf_dir), dtype="float32", device="cpu", kv_cache_memory_gib=0.05).engine


async def tokens(eng, rid, ids, params):
    return [t async for out in eng.generate(GenerateRequest(rid, ids, params)) for t in out.new_token_ids]


def test_two_engines_on_one_loop_give_their_own_tokens_from_one_thread(tiny_models):
    """Both engines built and stepped on the loop's one thread; each request gets the tokens it
    gets on an engine alone, while the other engine's requests share the loop."""
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=12, ignore_eos=True)
    prompts = {"llama": [5, 6, 7, 8], "qwen2": [9, 10, 11]}
    alone = {}
    for name, ids in prompts.items():
        llm = LLM(str(tiny_models[name].hf_dir), dtype="float32", device="cpu", kv_cache_memory_gib=0.05)
        alone[name] = llm.generate([ids], params)[0].token_ids

    compute = ComputeLoop().start()
    built_on = []

    def build(name):
        built_on.append(threading.current_thread())
        return tiny_engine(tiny_models, name)

    engines = {name: AsyncEngine.launch(lambda n=name: build(n), compute) for name in prompts}
    try:
        assert built_on == [compute.thread, compute.thread]

        async def main():
            jobs = [tokens(engines[n], f"{n}-{i}", ids, params) for n, ids in prompts.items() for i in range(3)]
            return await asyncio.gather(*jobs)

        results = asyncio.run(main())
        assert results == [alone["llama"]] * 3 + [alone["qwen2"]] * 3
        for eng in engines.values():
            snap = eng.load()
            assert snap.is_measured and snap.num_running == 0 and snap.backlog_tokens == 0
    finally:
        for eng in engines.values():
            eng.shutdown()
        compute.stop()
    assert not compute.is_running


def test_an_engine_leaving_the_loop_is_released_and_the_other_keeps_running(tiny_models):
    compute = ComputeLoop().start()
    a = AsyncEngine.launch(lambda: tiny_engine(tiny_models, "llama"), compute)
    b = AsyncEngine.launch(lambda: tiny_engine(tiny_models, "qwen2"), compute)
    a.shutdown()
    a.engine.add_request("offline", [5, 6], SamplingParams(max_tokens=2))  # released: this thread may drive it
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    try:
        assert len(asyncio.run(tokens(b, "r", [5, 6, 7], params))) == 4
        assert compute.is_running
    finally:
        b.shutdown()
        compute.stop()


def test_the_tracker_fits_step_time_against_tokens_and_sees_sharing():
    tracker = LoadTracker(max_num_batched_tokens=256, max_num_seqs=8)
    t = 0.0
    for i in range(200):  # a step costs 10 ms + 0.1 ms per token; another engine takes as long between
        tokens = (1, 64, 256)[i % 3]
        duration = 0.010 + 0.0001 * tokens
        tracker.observe_step(t, t + duration, tokens, num_finished=1 if i % 4 == 0 else 0)
        t += 2 * duration
    snap = tracker.publish(num_running=4, num_waiting=0, backlog_tokens=0)
    assert snap.step_base_s == pytest.approx(0.010, rel=1e-3)
    assert snap.step_per_token_s == pytest.approx(0.0001, rel=1e-3)
    assert 1.5 < snap.period_ratio < 2.5  # a step every two step times


def test_predictions_grow_with_the_backlog_and_a_full_batch():
    base = LoadSnapshot(
        num_running=2, max_num_batched_tokens=100, max_num_seqs=4, step_base_s=0.01, step_per_token_s=0.001,
        finished_per_s=2.0,
    )  # fmt: skip
    idle = base.predict_ttft_s(50)
    assert idle == pytest.approx(0.01 + 0.001 * 52)  # one step: the prompt beside two decodes
    backlog = LoadSnapshot(**{**base.__dict__, "backlog_tokens": 490})
    assert backlog.predict_ttft_s(50) > 5 * idle  # five more steps of prompt ahead of it
    # every slot taken by requests with 10, 10, 20, 30 tokens to go, three waiting with 5 each: they
    # start after 10, 10 and 15 steps (the first's slot), and the next slot frees after 15 (4 rows a step)
    full = LoadSnapshot(**{**base.__dict__, "num_running": 4, "num_waiting": 3, "running_left": (10, 10, 20, 30),
                           "waiting_outputs": (5, 5, 5)})  # fmt: skip
    assert full.slot_wait_s() == pytest.approx(15 * (0.01 + 0.001 * 4))
    assert full.predict_ttft_s(50) > full.slot_wait_s()
    # a batch that started together frees no slot until it ends, however fast requests finish on average
    together = LoadSnapshot(**{**base.__dict__, "num_running": 4, "running_left": (30,) * 4})
    assert together.slot_wait_s() == pytest.approx(30 * (0.01 + 0.001 * 4))
    assert LoadSnapshot(**{**together.__dict__, "num_running": 3, "running_left": (30,) * 3}).slot_wait_s() == 0
    slow = LoadSnapshot(**{**together.__dict__, "step_period_s": 0.5})  # steps measured slower than the fit
    assert slow.slot_wait_s() == pytest.approx(30 * 0.5)
    queued = LoadSnapshot(**{**together.__dict__, "num_waiting": 2})  # two not in the scheduler yet: 30 each
    assert queued.slot_wait_s() == pytest.approx(30 * (0.01 + 0.001 * 4))  # two slots of four taken again
    assert base.predict_tpot_s() == pytest.approx(0.01 + 0.001 * 3)
    assert base.drain_tokens_per_s == pytest.approx(98 / (0.01 + 0.1))


def test_an_engine_building_on_the_loop_lets_the_serving_one_step_between_pieces(tiny_models):
    """Loading a model at runtime runs on the loop's thread: without sharing, every stream of the
    engines already serving stops until the load ends (seconds for a real model)."""
    from ladle.config import EngineConfig
    from ladle.config_file import from_options
    from ladle.engine.llm import build_engine

    params = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)
    ids = [5, 6, 7, 8]
    alone = LLM(str(tiny_models["llama"].hf_dir), dtype="float32", device="cpu", kv_cache_memory_gib=0.05)
    expected = alone.generate([ids], params)[0].token_ids
    compute = ComputeLoop().start()
    a = AsyncEngine.launch(lambda: tiny_engine(tiny_models, "llama"), compute)
    config = from_options(EngineConfig, {"model": str(tiny_models["qwen2"].hf_dir), "dtype": "float32",
                                         "device": "cpu", "kv_cache_memory_gib": 0.05}, "test")  # fmt: skip
    stepped: list[int] = []  # per piece of b's load: how many engines stepped there
    progress: list[int] = []

    def build():
        before = a.engine.stats.num_steps
        engine = build_engine(config, between=lambda: stepped.append(compute.share(0.0)))
        progress.append(a.engine.stats.num_steps - before)
        return engine

    async def main():
        stream = a.generate(GenerateRequest("long", ids, params))
        first = await anext(stream)
        out = list(first.new_token_ids)
        b = await asyncio.to_thread(AsyncEngine.launch, build, compute)
        async for delta in stream:
            out.extend(delta.new_token_ids)
        return b, out

    try:
        b, out = asyncio.run(main())
        b.shutdown()
    finally:
        a.shutdown()
        compute.stop()
    assert len(stepped) >= 10 and stepped == [1] * len(stepped)  # a stepped at every piece of b's load
    assert progress == [len(stepped)]
    assert out == expected  # and its tokens are the ones it gets alone
    assert compute.share() == 0  # off the loop's thread it does nothing


def test_an_admitted_request_counts_as_waiting_until_submitted_and_a_forgotten_one_lapses(tiny_models, monkeypatch):
    """Requests that arrive together are admitted one after another before any is submitted: each
    must see the ones admitted before it, or a burst is admitted far past the model's target."""
    from ladle.engine import async_engine

    compute = ComputeLoop().start()
    eng = AsyncEngine.launch(lambda: tiny_engine(tiny_models, "llama"), compute)
    try:
        params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
        eng.reserve(GenerateRequest("r", [5, 6, 7], params))
        snap = eng.load()
        assert snap.num_waiting == 1 and snap.backlog_tokens == 3 and snap.waiting_outputs[-1:] == (9,)
        assert len(asyncio.run(tokens(eng, "r", [5, 6, 7], params))) == 9
        assert eng.load().num_waiting == 0  # generate took the reservation over: not counted twice
        eng.reserve(GenerateRequest("gone", [5], params))  # its client never submits it
        assert eng.load().num_waiting == 1
        monkeypatch.setattr(async_engine, "RESERVATION_S", -1.0)
        assert eng.load().num_waiting == 0 and eng.load().backlog_tokens == 0
    finally:
        eng.shutdown()
        compute.stop()


def test_timed_jobs_share_the_thread_with_busy_engines_by_time(tiny_models):
    """A batch of d seconds is followed by about d seconds of the busy engine's steps before the
    next batch: every batch sees the engine stepped since the one before (counted, not timed)."""
    import time

    compute = ComputeLoop().start()
    eng = AsyncEngine.launch(lambda: tiny_engine(tiny_models, "llama"), compute)
    seen_steps = []

    def batch():
        time.sleep(0.02)  # a 20 ms batch of a non-generative model
        seen_steps.append(eng.last_step_s)

    async def main():
        params = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
        stream = eng.generate(GenerateRequest("long", [5, 6, 7, 8], params))
        await anext(stream)  # the engine is busy from here
        jobs = [asyncio.wrap_future(compute.submit(batch, timed=True)) for _ in range(5)]
        await asyncio.gather(*jobs)
        async for _ in stream:
            pass

    try:
        asyncio.run(main())
    finally:
        eng.shutdown()
        compute.stop()
    assert len(seen_steps) == 5
    assert all(later > earlier for earlier, later in zip(seen_steps, seen_steps[1:], strict=False))
