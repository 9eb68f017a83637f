"""A request's tokens do not depend on how it is batched, cached, preempted, chunked, forked or
verified: greedy, and sampled with a seed.

On the embedded model, in float32, in the machine's default dtype (bfloat16 where the CPU has
native bf16) and in w8a8: every request run alone is the reference; the same 31 requests batched
together must give the same tokens with prefix caching off and on (the second time nearly every
prompt block is a hit), with a KV cache so small that preemption happens again and again, with
chunked-prefill budgets of 16 and 64 tokens, with n-gram speculation in every step, and as the
samples of one request with n = 3. After each run every KV block is free again. The offline
engine is driven step by step in this thread: nothing here depends on timing.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from ladle.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
from ladle.engine.llm import LLM
from ladle.platform import resolve_dtype
from ladle.runner.model_runner import KVCache
from ladle.sample.params import SamplingParams

pytestmark = pytest.mark.slow

WORDS = (
    "the of and to in is was for on that with as by at from his her an were which are this be or had "
    "not but river city music light stone paper garden winter market"
).split()
FORMS = {  # name: (dtype, quantization)
    "float32": ("float32", "none"),
    "default": ("auto", "none"),  # bfloat16 where the CPU has native bf16 (what `ladle serve` runs)
    "w8a8": ("auto", "w8a8"),
}


def make_prompts() -> list[str]:
    rng = random.Random(0)
    shared = " ".join(rng.choice(WORDS) for _ in range(80))  # a common "system prompt"
    prompts = []
    for i in range(31):
        tail = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 110)))
        prompts.append(f"{shared} {tail}" if i % 2 else tail)
    return prompts


def make_params(max_tokens: int = 10) -> list[SamplingParams]:
    """Every third request greedy, the others sampled with a seed of their own."""
    return [
        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        if i % 3 == 0
        else SamplingParams(temperature=0.8, top_p=0.95, seed=1000 + i, max_tokens=max_tokens, ignore_eos=True)
        for i in range(31)
    ]


@pytest.fixture(scope="module", params=list(FORMS))
def loaded(request, embedded_source, embedded_fp32):
    dtype, quantization = FORMS[request.param]
    if request.param == "float32":
        return embedded_fp32
    if request.param == "default" and resolve_dtype("auto", "cpu") == embedded_fp32.dtype:
        pytest.skip("the default dtype is float32 on this CPU: the float32 run covers it")
    from ladle.model.loader import load_model
    from ladle.runner.model_runner import prefill_hidden_states

    return load_model(
        embedded_source, dtype=dtype, device="cpu", quantization=quantization,
        calibration_cache=ModelConfig().calibration_cache, calibration_forward=prefill_hidden_states,
    )  # fmt: skip


def make_llm(loaded, prefix=False, budget=2048, kv_gib=0.25, max_model_len=512, block_size=16, spec=None) -> LLM:
    config = EngineConfig(
        model=ModelConfig(device="cpu", max_model_len=max_model_len),
        cache=CacheConfig(block_size=block_size, kv_cache_memory_gib=kv_gib, enable_prefix_caching=prefix),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget),
        speculative=spec or SpeculativeConfig(),
    )
    return LLM(config=config, loaded=loaded)


@pytest.fixture(scope="module")
def prompts():
    return make_prompts()


@pytest.fixture(scope="module")
def reference(loaded, prompts):
    llm = make_llm(loaded)
    return [llm.generate(p, q)[0].token_ids for p, q in zip(prompts, make_params(), strict=True)]


def run_batched(llm: LLM, prompts, params=None) -> list[list[int]]:
    results = llm.generate(prompts, params or make_params())
    assert all(s.finish_reason == "length" for r in results for s in r.samples)
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


def test_a_prompt_that_extends_a_finished_request_hits_its_decoded_blocks(loaded, prompts):
    """Multi-turn: the next prompt holds the last one and its reply, whose K/V was computed by
    decode steps; reading them from the cache gives what computing them in a prompt gives."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    llm = make_llm(loaded, prefix=True)
    first = llm.generate(prompts[1], params)[0]
    follow_up = first.prompt_token_ids + first.token_ids + llm.tokenizer.encode(" and then")
    cached = llm.generate([follow_up], params)[0]
    assert cached.num_cached_tokens >= 16 * ((len(first.prompt_token_ids) + 40) // 16) - 16
    assert cached.token_ids == make_llm(loaded).generate([follow_up], params)[0].token_ids


def test_tiny_kv_cache_preempts_repeatedly_and_still_matches(loaded, prompts):
    # longer outputs, so that running requests keep outgrowing the cache
    params = make_params(max_tokens=24)[:10]
    subset = sorted(prompts, key=len)[:10]  # short prompts: many requests fit, then outgrow the cache
    roomy = make_llm(loaded)
    expected = [roomy.generate(p, q)[0].token_ids for p, q in zip(subset, params, strict=True)]
    # 30 blocks of 4 tokens: room for two or three requests, and every 4th token needs a new block
    per_block = KVCache.bytes_per_block(loaded, 4)
    llm = make_llm(loaded, kv_gib=30.5 * per_block / 2**30, max_model_len=120, block_size=4)
    assert llm.engine.kv.pool.num_blocks == 30
    assert run_batched(llm, subset, params) == expected
    stats = llm.engine.stats
    assert stats.num_preemptions >= 3
    assert stats.num_computed_tokens > stats.num_prompt_tokens + stats.num_generated_tokens  # recomputed
    assert llm.engine.kv.num_free_blocks == 30


@pytest.mark.parametrize("budget", [16, 64])
def test_chunked_prefill_budgets_match(loaded, prompts, reference, budget):
    assert run_batched(make_llm(loaded, budget=budget), prompts) == reference


def test_ngram_speculation_in_every_step_matches(loaded, prompts, reference):
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=4, disable_batch_size=0)
    llm = make_llm(loaded, spec=spec, budget=256)
    assert run_batched(llm, prompts) == reference
    assert llm.engine.stats.spec_num_draft_tokens > 0


def test_the_samples_of_one_request_are_the_requests_of_their_seeds(loaded, prompts, reference):
    """n = 3 with seed s: sample i is what one request with seed s + i gives, whenever the fork
    comes and whatever runs beside it."""
    params = make_params()
    forked = replace(params[1], n=3)
    alone = make_llm(loaded)
    expected = [alone.generate(prompts[1], forked.for_sample(i))[0].token_ids for i in range(3)]
    assert expected[0] == reference[1]
    for budget in (2048, 16):  # the fork after one prompt step, and after many small ones
        llm = make_llm(loaded, budget=budget)
        results = llm.generate(prompts[:8], [forked if i == 1 else p for i, p in enumerate(params[:8])])
        assert [s.token_ids for s in results[1].samples] == expected
        others = [i for i in range(8) if i != 1]
        assert [results[i].token_ids for i in others] == [reference[i] for i in others]
        assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks
