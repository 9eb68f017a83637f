"""Prompt logprobs (vLLM's prompt_logprobs): every prompt token's logprob and best alternatives,
equal to transformers' log_softmax on the same weights, whatever else is batched or cached, and
however the prompt is chunked."""

from __future__ import annotations

import pytest
import torch

from ladle.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from ladle.engine.llm import LLM
from ladle.errors import InvalidRequestError
from ladle.sample.params import SamplingParams

ATOL = 2e-4  # the logits agree within 1e-4 (tests/model/test_reference_logits.py)
K = 3


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def loaded(tiny):
    from ladle.model.loader import load_model
    from ladle.model.source import resolve_model

    return load_model(resolve_model(str(tiny.hf_dir)), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def reference_model(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny.hf_dir, dtype=torch.float32).eval()


def engine(loaded, **sched) -> LLM:
    config = EngineConfig(
        model=ModelConfig(dtype="float32", device="cpu", max_model_len=512),
        cache=CacheConfig(kv_cache_memory_gib=0.05, block_size=4),
        scheduler=SchedulerConfig(**sched),
    )
    return LLM(config=config, loaded=loaded)


def prompt_ids(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def reference(model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab] log_softmax of transformers' logits: row p predicts token p + 1."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1]


def assert_matches_reference(prompt_logprobs, ids: list[int], ref: torch.Tensor, k: int = K) -> None:
    assert len(prompt_logprobs) == len(ids)
    assert prompt_logprobs[0] is None
    got = torch.tensor([lp.logprob for lp in prompt_logprobs[1:]])
    torch.testing.assert_close(got, ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0], atol=ATOL, rtol=0)
    for p, lp in enumerate(prompt_logprobs[1:]):
        assert len(lp.top) == k
        ref_vals, _ = ref[p].topk(k)
        torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), ref_vals, atol=ATOL, rtol=0)
        for token, value in lp.top:  # the alternatives are the best ones (ties within the tolerance aside)
            assert abs(ref[p, token].item() - value) <= ATOL


def test_prompt_logprobs_equal_transformers(loaded, tiny, reference_model):
    ids = prompt_ids(37, seed=1, vocab=tiny.config.vocab_size)
    (result,) = engine(loaded).generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=K))
    assert len(result.token_ids) == 1
    assert_matches_reference(result.prompt_logprobs, ids, reference(reference_model, ids))


def test_chunked_prefill_gives_the_same_values(loaded, tiny, reference_model):
    ids = prompt_ids(50, seed=2, vocab=tiny.config.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=K)
    whole = engine(loaded).generate([ids], params)[0]
    llm = engine(loaded, max_num_batched_tokens=16)  # the prompt computes in 4 chunks
    chunked = llm.generate([ids], params)[0]
    assert llm.engine.stats.num_steps >= 4 + 2
    assert_matches_reference(chunked.prompt_logprobs, ids, reference(reference_model, ids))
    for a, b in zip(whole.prompt_logprobs[1:], chunked.prompt_logprobs[1:], strict=True):
        assert abs(a.logprob - b.logprob) <= 1e-5
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
    assert chunked.token_ids == whole.token_ids


def test_others_in_the_batch_are_unchanged_and_keep_their_prefix_hits(loaded, tiny, reference_model):
    vocab = tiny.config.vocab_size
    shared = prompt_ids(24, seed=3, vocab=vocab)
    warm, cached, scored = shared + [5, 6], shared + [7, 8, 9], shared + [10, 11]
    other = prompt_ids(13, seed=4, vocab=vocab)
    plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    sampled = SamplingParams(temperature=0.9, seed=7, max_tokens=8, ignore_eos=True)

    alone = engine(loaded)
    expected = [r.token_ids for r in alone.generate([cached, other, other], [plain, plain, sampled])]

    llm = engine(loaded)
    llm.generate([warm], plain)  # files the shared blocks
    results = llm.generate(
        [scored, cached, other, other],
        [SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=K), plain, plain, sampled],
    )
    assert [r.token_ids for r in results[1:]] == expected
    assert results[0].num_cached_tokens == 0  # it computed its own prompt
    assert results[1].num_cached_tokens == 24  # the other one still hit on every shared block
    assert all(r.prompt_logprobs is None for r in results[1:])
    assert_matches_reference(results[0].prompt_logprobs, scored, reference(reference_model, scored))
    # after it, the shared prefix is still cached for others
    again = llm.generate([cached], plain)[0]
    assert again.num_cached_tokens == 24 and again.token_ids == expected[0]
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks


def test_max_tokens_0_scores_the_prompt_and_generates_nothing(loaded, tiny, reference_model):
    ids = prompt_ids(21, seed=5, vocab=tiny.config.vocab_size)
    llm = engine(loaded)
    zero, one = llm.generate(
        [ids, ids], [SamplingParams(max_tokens=0, prompt_logprobs=0), SamplingParams(max_tokens=1, prompt_logprobs=0)]
    )
    assert zero.token_ids == [] and zero.text == ""
    assert zero.samples[0].finish_reason == "length"
    assert len(one.token_ids) == 1 and one.samples[0].finish_reason == "length"
    ref = reference(reference_model, ids)
    assert_matches_reference(zero.prompt_logprobs, ids, ref, k=0)
    assert_matches_reference(one.prompt_logprobs, ids, ref, k=0)
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks


def test_every_sample_gets_them_once_and_one_token_prompts_work(loaded, tiny):
    ids = prompt_ids(11, seed=6, vocab=tiny.config.vocab_size)
    llm = engine(loaded)
    llm.engine.add_request("a", ids, SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=4, prompt_logprobs=1))
    llm.engine.add_request("b", ids[:1], SamplingParams(max_tokens=2, prompt_logprobs=1))
    seen: dict[tuple[str, int], list] = {}
    while llm.engine.has_unfinished():
        for out in llm.engine.step():
            if out.prompt_logprobs is not None:
                assert (out.request_id, out.index) not in seen  # once per sample
                seen[(out.request_id, out.index)] = out.prompt_logprobs
    assert set(seen) == {("a", 0), ("a", 1), ("b", 0)}
    assert seen[("a", 0)] == seen[("a", 1)] and len(seen[("a", 0)]) == len(ids)
    assert seen[("b", 0)] == [None]


def test_a_request_preempted_in_its_prefill_recomputes_them(loaded, tiny, reference_model):
    """10 blocks of 4 tokens: the scoring request's prefill chunks (8 tokens a step) run beside a
    decode that grows to 10 blocks, so it is preempted half-way through its prompt, waits, and
    computes the prompt again from the start: its values are those of one clean pass."""
    from ladle.runner.model_runner import KVCache

    vocab = tiny.config.vocab_size
    decoding, scored = prompt_ids(8, seed=7, vocab=vocab), prompt_ids(30, seed=8, vocab=vocab)
    per_block = KVCache.bytes_per_block(loaded, 4)
    config = EngineConfig(
        model=ModelConfig(dtype="float32", device="cpu", max_model_len=40),
        cache=CacheConfig(kv_cache_memory_gib=10.5 * per_block / 2**30, block_size=4),
        scheduler=SchedulerConfig(max_num_batched_tokens=8),
    )
    llm = LLM(config=config, loaded=loaded)
    assert llm.engine.kv.pool.num_blocks == 10
    core = llm.engine
    core.add_request("a", decoding, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    core.add_request("b", scored, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=K))
    b = core.groups["b"][0]
    filed_when_preempted, preemptions, reported, tokens = [], 0, [], []
    while core.has_unfinished():
        filed = len(b.prompt_logprobs)
        for out in core.step():
            if out.request_id == "b":
                tokens += out.new_token_ids
                if out.prompt_logprobs is not None:
                    reported.append(out.prompt_logprobs)
        if b.num_preemptions > preemptions:
            preemptions = b.num_preemptions
            filed_when_preempted.append(filed)
    assert any(1 < n < len(scored) for n in filed_when_preempted)  # preempted with part of its prompt done
    assert len(reported) == 1
    assert_matches_reference(reported[0], scored, reference(reference_model, scored))
    alone = engine(loaded).generate([scored], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))[0]
    assert tokens == alone.token_ids


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"max_tokens": 0}, "max_tokens"),  # 0 only for a request that scores its prompt
        ({"max_tokens": -1, "prompt_logprobs": 0}, "max_tokens"),
    ],
)
def test_bad_prompt_logprobs_params_name_the_field(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param
