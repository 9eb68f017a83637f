"""Automatic prefix caching on the embedded model: a shared system prompt is computed once."""

from __future__ import annotations

import pytest

from ladle.config import CacheConfig, EngineConfig, ModelConfig
from ladle.engine.llm import LLM
from ladle.sample.params import SamplingParams

pytestmark = pytest.mark.slow


def test_shared_1000_token_system_prompt_is_computed_once_across_20_requests(embedded_fp32):
    llm = LLM(
        config=EngineConfig(model=ModelConfig(max_model_len=2048), cache=CacheConfig(kv_cache_memory_gib=0.5)),
        loaded=embedded_fp32,
    )
    tok = llm.tokenizer
    system = " ".join(f"Rule {i}: answer briefly and cite the handbook section {i}." for i in range(80))
    questions = [f"Question {i}: what does rule {i * 3} say?" for i in range(20)]
    prompts = [
        tok.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": q}]) for q in questions
    ]
    shared = len(tok.encode_chat([{"role": "system", "content": system}], add_generation_prompt=False))
    assert shared >= 1000
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    results = llm.generate(prompts, params)  # all 20 arrive at once

    stats = llm.engine.stats
    total_prompt = sum(len(p) for p in prompts)
    computed_prompt = stats.num_computed_tokens - (stats.num_generated_tokens - len(prompts))
    unique_per_request = max(len(p) for p in prompts) - shared + llm.config.cache.block_size
    assert computed_prompt <= shared + 20 * unique_per_request  # the shared part ran through the model once
    assert computed_prompt < total_prompt / 10
    assert stats.prefix_hit_rate >= 0.9  # 19 of 20 requests hit on every shared block
    assert all(r.num_cached_tokens >= shared - llm.config.cache.block_size for r in results[1:])
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks

    # the cached answers equal those computed without the cache
    cold = LLM(
        config=EngineConfig(
            model=ModelConfig(max_model_len=2048),
            cache=CacheConfig(kv_cache_memory_gib=0.5, enable_prefix_caching=False),
        ),
        loaded=embedded_fp32,
    )
    assert [r.token_ids for r in cold.generate(prompts[:3], params)] == [r.token_ids for r in results[:3]]


def test_a_request_that_ends_in_its_prefill_step_leaves_its_prompt_cached(embedded_fp32):
    """max_tokens 1 (the first token comes with the last prefill chunk, and ends the request):
    its prompt's full blocks are filed before they are freed, so the next request finds them."""
    llm = LLM(config=EngineConfig(model=ModelConfig(max_model_len=1024), cache=CacheConfig(kv_cache_memory_gib=0.2)),
              loaded=embedded_fp32)  # fmt: skip
    prompt = llm.tokenizer.encode(" ".join(f"line {i} of a long shared document" for i in range(40)))
    block = llm.config.cache.block_size
    first = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))[0]
    assert first.num_cached_tokens == 0 and len(first.token_ids) == 1
    second = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3))[0]
    assert second.num_cached_tokens == (len(prompt) - 1) // block * block  # every full block but the last token's
    assert second.token_ids[0] == first.token_ids[0]
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks
