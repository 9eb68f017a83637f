"""The async engine: deltas stream to coroutines, aborts free blocks, the event loop stays free."""

from __future__ import annotations

import asyncio
import time

import pytest

from ladle.engine.async_engine import AsyncEngine
from ladle.engine.core import EngineOwnershipError
from ladle.engine.llm import LLM
from ladle.engine.request import GenerateRequest
from ladle.errors import InvalidRequestError
from ladle.sample.params import SamplingParams


def offline_llm(tiny_models) -> LLM:
    return LLM(str(tiny_models["qwen2"].hf_dir), dtype="float32", device="cpu", kv_cache_memory_gib=0.05)


@pytest.fixture
def engine(tiny_models):
    llm = offline_llm(tiny_models)
    eng = AsyncEngine(llm.engine)
    eng.start()
    yield eng, llm
    eng.shutdown()


async def collect(eng, rid, ids, params):
    deltas = []
    async for out in eng.generate(GenerateRequest(rid, ids, params)):
        deltas.append(out)
    return deltas


def test_streamed_deltas_add_up_to_the_offline_result(engine, tiny_models):
    eng, llm = engine
    ids = llm.tokenizer.encode("The quick brown fox")
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    # the offline reference runs on an engine of its own: the fixture's is driven by the loop thread
    expected = offline_llm(tiny_models).generate([ids], params)[0]
    assert len(expected.token_ids) == 20

    async def main():
        return await asyncio.gather(*(collect(eng, f"r{i}", ids, params) for i in range(4)))

    for deltas in asyncio.run(main()):
        assert "".join(d.new_text for d in deltas) == expected.text
        assert [t for d in deltas for t in d.new_token_ids] == expected.token_ids
        assert deltas[-1].finished and deltas[-1].finish_reason == "length"
        assert deltas[-1].metrics is not None and deltas[-1].metrics.first_token_s is not None


def test_a_second_thread_driving_a_running_engine_fails_at_once(engine):
    eng, llm = engine
    ids = llm.tokenizer.encode("The quick brown fox")
    # the loop thread claims the engine as it starts; wait for that without relying on timing
    asyncio.run(eng.call(lambda core: None))
    with pytest.raises(EngineOwnershipError, match="AsyncEngine's loop thread"):
        llm.generate([ids], SamplingParams(max_tokens=4))
    with pytest.raises(EngineOwnershipError):
        llm.engine.step()
    with pytest.raises(EngineOwnershipError):
        llm.engine.abort("nobody")
    assert not llm.engine.has_unfinished()  # the refused request never reached the scheduler
    eng.shutdown()
    assert len(llm.generate([ids], SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids) == 4  # released


def test_a_call_runs_on_the_loop_thread_between_steps(engine):
    import threading

    eng, _ = engine

    async def main():
        return await eng.call(lambda core: threading.current_thread())

    assert asyncio.run(main()) is eng.compute.thread is not threading.current_thread()


def test_leaving_the_stream_aborts_and_frees_every_block(engine):
    eng, llm = engine
    ids = llm.tokenizer.encode("def main(): return")

    async def main():
        params = SamplingParams(max_tokens=300, ignore_eos=True)
        streams = [eng.generate(GenerateRequest(f"cut{i}", ids, params)) for i in range(8)]
        for s in streams:
            for _ in range(3):
                await s.__anext__()
        for s in streams:
            await s.aclose()  # what a disconnecting client's handler does
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            core = eng.engine
            if not core.scheduler.has_work() and core.kv.num_free_blocks == core.kv.pool.num_blocks:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main())
    assert not eng.engine.groups


def test_the_event_loop_keeps_running_during_generation(engine):
    eng, llm = engine
    ids = llm.tokenizer.encode("Paris is")

    async def main():
        ticks = 0
        stop = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        seen = []
        async for _ in eng.generate(GenerateRequest("t", ids, SamplingParams(max_tokens=40, ignore_eos=True))):
            seen.append(ticks)
        stop.set()
        await task
        return seen

    seen = asyncio.run(main())
    assert seen[-1] > seen[0]  # the ticker ran between deltas: no step blocked the loop


def test_bad_requests_fail_in_the_caller(engine):
    eng, llm = engine

    async def main():
        with pytest.raises(InvalidRequestError, match="context length"):
            await collect(eng, "long", [5] * 600, SamplingParams())
        with pytest.raises(InvalidRequestError, match="vocabulary"):
            await collect(eng, "bad", [10**7], SamplingParams())

    asyncio.run(main())


def test_n_samples_stream_with_their_index(engine):
    eng, llm = engine
    ids = llm.tokenizer.encode("lazy dog")
    deltas = asyncio.run(collect(eng, "n", ids, SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=8)))
    assert {d.index for d in deltas} == {0, 1}
    assert sum(d.finished for d in deltas) == 2


def test_launch_builds_the_engine_on_its_loop_thread(tiny_models):
    """All tensor work (loading, warm-up, steps) runs on one thread, so PyTorch keeps one OpenMP
    team: a second thread with a team makes libgomp stop spinning and every op pays wake-ups."""
    import threading

    built_on = []

    def build():
        built_on.append(threading.current_thread())
        return LLM(str(tiny_models["qwen2"].hf_dir), dtype="float32", device="cpu", kv_cache_memory_gib=0.05).engine

    eng = AsyncEngine.launch(build)
    try:
        assert built_on == [eng._thread] and eng.is_running and built_on[0] is not threading.current_thread()

        async def main():
            return await collect(eng, "r", [5, 6, 7], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))

        assert len([t for d in asyncio.run(main()) for t in d.new_token_ids]) == 5
    finally:
        eng.shutdown()
    assert not eng.is_running


def test_launch_raises_what_building_raised():
    def build():
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        AsyncEngine.launch(build)
