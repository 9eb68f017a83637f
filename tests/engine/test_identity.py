"""Greedy outputs do not depend on how requests are batched, cached, preempted or chunked.

On the embedded model in float32: every request alone is the reference; the same 31 requests
batched together must give the same tokens with prefix caching off and on, with a KV cache so
small that preemption happens again and again, and with chunked-prefill budgets of 16, 64 and
2048 tokens. After each run every KV block is free again.
"""

from __future__ import annotations

import random

import pytest

from ladle.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from ladle.engine.llm import LLM
from ladle.runner.model_runner import KVCache
from ladle.sample.params import SamplingParams

pytestmark = pytest.mark.slow

PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
WORDS = (
    "the of and to in is was for on that with as by at from his her an were which are this be or had "
    "not but river city music light stone paper garden winter market"
).split()


def make_prompts() -> list[str]:
    rng = random.Random(0)
    shared = " ".join(rng.choice(WORDS) for _ in range(80))  # a common "system prompt"
    prompts = []
    for i in range(31):
        tail = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 110)))
        prompts.append(f"{shared} {tail}" if i % 2 else tail)
    return prompts


@pytest.fixture(scope="module")
def loaded(embedded_fp32):
    return embedded_fp32


def make_llm(loaded, prefix=False, budget=2048, kv_gib=0.25, max_model_len=512, block_size=16) -> LLM:
    config = EngineConfig(
        model=ModelConfig(dtype="float32", device="cpu", max_model_len=max_model_len),
        cache=CacheConfig(block_size=block_size, kv_cache_memory_gib=kv_gib, enable_prefix_caching=prefix),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget),
    )
    return LLM(config=config, loaded=loaded)


@pytest.fixture(scope="module")
def prompts():
    return make_prompts()


@pytest.fixture(scope="module")
def reference(loaded, prompts):
    llm = make_llm(loaded)
    return [llm.generate(p, PARAMS)[0].token_ids for p in prompts]


def run_batched(llm: LLM, prompts) -> list[list[int]]:
    results = llm.generate(prompts, PARAMS)
    assert all(r.samples[0].finish_reason == "length" for r in results)
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks  # every block is free again
    assert not llm.engine.scheduler.has_work()
    return [r.token_ids for r in results]


def test_batched_equals_alone(loaded, prompts, reference):
    assert run_batched(make_llm(loaded), prompts) == reference


def test_prefix_caching_on_equals_off(loaded, prompts, reference):
    llm = make_llm(loaded, prefix=True)
    assert run_batched(llm, prompts) == reference
    assert run_batched(llm, prompts) == reference  # the second time nearly every prompt block is a hit
    assert llm.engine.stats.prefix_hit_blocks > 0


def test_tiny_kv_cache_preempts_repeatedly_and_still_matches(loaded, prompts):
    # longer outputs, so that running requests keep outgrowing the cache
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    subset = sorted(prompts, key=len)[:10]  # short prompts: many requests fit, then outgrow the cache
    roomy = make_llm(loaded)
    expected = [roomy.generate(p, params)[0].token_ids for p in subset]
    # 30 blocks of 4 tokens: room for two or three requests, and every 4th token needs a new block
    per_block = KVCache.bytes_per_block(loaded, 4)
    llm = make_llm(loaded, kv_gib=30.5 * per_block / 2**30, max_model_len=120, block_size=4)
    assert llm.engine.kv.pool.num_blocks == 30
    results = llm.generate(subset, params)
    assert [r.token_ids for r in results] == expected
    stats = llm.engine.stats
    assert stats.num_preemptions >= 3
    assert stats.num_computed_tokens > stats.num_prompt_tokens + stats.num_generated_tokens  # recomputed
    assert llm.engine.kv.num_free_blocks == 30


@pytest.mark.parametrize("budget", [16, 64, 2048])
def test_chunked_prefill_budgets_match(loaded, prompts, reference, budget):
    assert run_batched(make_llm(loaded, budget=budget), prompts) == reference
