"""Speculative decoding: n-gram and draft-model proposals, verification, scheduling, metrics, errors.

What users rely on: greedy output is token for token the output without speculation (the n-gram
and the draft-model proposer, on 20 prompts, with requests that opt out in the same steps);
sampled output keeps its distribution (chi-square, on the verifier alone and through the engine);
guesses never cost anyone their KV blocks; speculation pauses for large batches; bad setups fail
at startup.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from ladle.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
from ladle.engine.kv_manager import KVCacheManager
from ladle.engine.llm import LLM
from ladle.engine.request import Request
from ladle.engine.scheduler import Scheduler
from ladle.engine.speculative import NgramIndex, SpeculationPolicy, propose_ngram
from ladle.errors import LadleError
from ladle.sample.params import SampleSpec, SamplingParams
from ladle.sample.sampler import SampleGroup, Sampler

# -- the n-gram proposer ---------------------------------------------------------------------------


def test_ngram_proposes_what_followed_the_latest_longest_match():
    #         0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 8, 9, 5, 6, 1, 2, 5, 6]
    # suffix (5, 6) occurred at 0 (then 7, 8...) and at 5 (then 1, 2...): the latest wins
    assert propose_ngram(tokens, 3, 1, 3) == [1, 2, 5]
    # the longest suffix first: (1, 5, 6)... no; (2, 5, 6) no; (5, 6) yes
    assert propose_ngram(tokens + [1], 2, 1, 3) == [2, 5]  # (5, 6, 1) matched at 5..7
    assert propose_ngram([1, 2, 3, 4], 3, 1, 3) == []  # the last token never occurred before
    assert propose_ngram([4, 4], 5, 1, 2) == [4]  # stops at the end of what is known
    assert propose_ngram([9], 3, 1, 3) == []


def test_ngram_index_grows_incrementally_and_agrees_with_one_shot():
    rng = random.Random(0)
    tokens = [rng.randrange(6) for _ in range(40)]
    index = NgramIndex(1, 3)
    for end in range(1, len(tokens) + 1):
        assert index.propose(tokens[:end], 4) == propose_ngram(tokens[:end], 4, 1, 3), end


# -- scheduling and policy (no model) ----------------------------------------------------------------


def decoding_request(rid="a", prompt_len=8, max_tokens=50, guesses=(1, 2, 3)) -> Request:
    r = Request(rid, list(range(10, 10 + prompt_len)), SamplingParams(max_tokens=max_tokens), max_total_tokens=1000)
    r.output_token_ids = [3]
    r.num_computed_tokens = prompt_len  # the newest (output) token is the one left to compute
    r.spec_token_ids = list(guesses)
    return r


def test_guesses_ride_with_the_decode_within_budget_and_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=3), kv)
    r = decoding_request()
    assert kv.allocate(r, 1)
    s.running.append(r)
    from ladle.engine.request import RequestStatus

    r.status = RequestStatus.RUNNING
    out = s.schedule()
    (chunk,) = out.chunks
    assert (chunk.num_tokens, chunk.num_spec, chunk.samples) == (3, 2, True)  # budget 3: the token + 2 guesses


def test_guesses_are_dropped_rather_than_preempting_anyone():
    from ladle.engine.request import RequestStatus

    kv = KVCacheManager(num_blocks=5, block_size=4)
    s = Scheduler(SchedulerConfig(), kv)
    a, b = decoding_request("a", prompt_len=7), decoding_request("b", prompt_len=7, guesses=(1, 2, 3, 4, 5))
    for r in (a, b):
        assert kv.allocate(r, 1)  # 8 tokens: two blocks each, one block left
        r.status = RequestStatus.RUNNING
        s.running.append(r)
    out = s.schedule()
    chunks = {c.request.request_id: c for c in out.chunks}
    assert not out.preempted
    assert chunks["a"].num_spec == 3  # positions 8..11: the free block
    assert chunks["b"].num_spec == 0  # no block left for its guesses: it decodes plainly


def test_policy_limits_guesses_to_max_tokens_and_small_batches():
    policy = SpeculationPolicy(SpeculativeConfig(method="ngram", num_speculative_tokens=5, disable_batch_size=4))
    r = decoding_request(max_tokens=4)  # one token out, three to go: two guesses + one sampled token
    assert policy.num_tokens(r, batch_size=1) == 2
    assert policy.num_tokens(r, batch_size=5) == 0
    r.params = SamplingParams(max_tokens=50, speculative=False)
    assert policy.num_tokens(r, batch_size=1) == 0
    never_off = SpeculationPolicy(SpeculativeConfig(method="ngram", disable_batch_size=0))
    assert never_off.num_tokens(decoding_request(), batch_size=500) == 5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="ngram", num_speculative_tokens=0), "--num-speculative-tokens must be at least 1"),
        (dict(method="draft"), "needs --draft-model"),
        (dict(method="medusa"), "unknown speculative method"),
        (dict(method="ngram", ngram_min=3, ngram_max=2), "--ngram-min"),
        (dict(method="ngram", draft_model="x.gguf"), "only used with --speculative draft"),
    ],
)
def test_bad_speculative_settings_fail_with_their_flag(kwargs, message):
    with pytest.raises(LadleError, match=message):
        SpeculativeConfig(**kwargs)


# -- the verifier alone: rejection sampling keeps the distribution --------------------------------


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


@pytest.mark.parametrize("proposer", ["draft", "ngram"])
def test_verified_sampling_emits_the_target_distribution(proposer):
    torch.manual_seed(0)
    vocab, k, trials = 5, 2, 6000
    p_logits = torch.randn(k + 1, vocab) * 1.5  # the target's rows: after the token, after guess 1, 2
    q = torch.softmax(torch.randn(k, vocab) * 1.5, dim=-1)  # the draft's distributions
    p = torch.softmax(p_logits, dim=-1)
    params = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(1)
    groups = []
    for _ in range(trials):
        if proposer == "draft":
            guesses = [int(torch.multinomial(q[j], 1, generator=gen)) for j in range(k)]
            groups.append(SampleGroup([SampleSpec(params, [], [])] * (k + 1), guesses))
        else:  # an n-gram guess is certain: a point mass
            likely = [int(p[j].argmax()) for j in range(k)]
            groups.append(SampleGroup([SampleSpec(params, [], [])] * (k + 1), likely))
    tokens, _ = Sampler(seed=2).sample(p_logits.repeat(trials, 1), groups)
    first = torch.bincount(torch.tensor([t[0] for t in tokens]), minlength=vocab).float()
    assert chi2(first, p[0]) < 18.47  # p = 0.001, 4 degrees of freedom
    # after a kept first guess, the next token follows row 1 (whether kept guess or resampled)
    second = [t[1] for t, g in zip(tokens, groups, strict=True) if len(t) > 1 and t[0] == g.guesses[0]]
    assert len(second) > 500
    assert chi2(torch.bincount(torch.tensor(second), minlength=vocab).float(), p[1]) < 18.47
    assert max(len(t) for t in tokens) == k + 1  # sometimes every guess is kept and one more follows


def test_greedy_verification_keeps_guesses_while_they_match_the_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])  # argmax 1, 0, 2
    greedy = [SampleSpec(SamplingParams(temperature=0), [], [])] * 3
    sampler = Sampler()
    assert sampler.sample(logits, [SampleGroup(greedy, [1, 0])])[0] == [[1, 0, 2]]
    assert sampler.sample(logits, [SampleGroup(greedy, [1, 2])])[0] == [[1, 0]]
    assert sampler.sample(logits, [SampleGroup(greedy, [2, 0])])[0] == [[1]]


# -- through the engine -------------------------------------------------------------------------------

WORDS = "the river city stone paper garden winter market light music def return x = [1, 2, 3]".split()


def identity_prompts(n=20) -> list[str]:
    """Prompts with repeats in them, so that n-gram guesses come up."""
    rng = random.Random(1)
    prompts = []
    for _ in range(n):
        phrase = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))
        prompts.append(" ".join([phrase] * rng.randint(2, 4)) + " " + rng.choice(WORDS))
    return prompts


def engine(loaded, spec: SpeculativeConfig | None = None, **sched) -> LLM:
    config = EngineConfig(
        model=ModelConfig(dtype="float32", device="cpu", max_model_len=512),
        cache=CacheConfig(kv_cache_memory_gib=0.1),
        scheduler=SchedulerConfig(**sched),
        speculative=spec or SpeculativeConfig(),
    )
    return LLM(config=config, loaded=loaded)


def generate_all(llm: LLM, prompts, params) -> list[list[int]]:
    results = llm.generate(prompts, params)
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks  # every block is free again
    return [r.token_ids for r in results]


@pytest.fixture(scope="module")
def tiny_llama(tiny_models):
    from ladle.model.loader import load_model
    from ladle.model.source import resolve_model

    return load_model(resolve_model(str(tiny_models["llama"].hf_dir)), dtype="float32", device="cpu")


@pytest.mark.slow
def test_greedy_ngram_equals_plain_on_the_embedded_model(embedded_fp32):
    prompts = identity_prompts()
    params = [SamplingParams(temperature=0, max_tokens=24, speculative=i % 5 != 0) for i in range(len(prompts))]
    plain = generate_all(engine(embedded_fp32), prompts, params)
    spec = engine(embedded_fp32, SpeculativeConfig(method="ngram", num_speculative_tokens=4, disable_batch_size=0))
    assert generate_all(spec, prompts, params) == plain  # all 20 in one batch, 4 of them opted out
    s = spec.engine.stats
    assert s.spec_num_draft_tokens > 100 and s.spec_num_accepted_tokens > 20
    assert 1.0 < s.spec_mean_accepted_length <= 5.0
    # one at a time (no other request in the step) gives the same tokens too
    alone = engine(embedded_fp32, SpeculativeConfig(method="ngram", num_speculative_tokens=6))
    assert [generate_all(alone, [p], q)[0] for p, q in zip(prompts[:5], params[:5], strict=True)] == plain[:5]


@pytest.mark.slow
@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_a_draft_model_gives_the_tokens_of_plain_decoding(tiny_models, tiny_llama, seeded):
    """Greedy, and sampled with a seed (the draft draws with the uniforms the verification uses)."""
    prompts = identity_prompts()
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    if seeded:
        params = [
            SamplingParams(temperature=0.9, top_p=0.95, seed=i, max_tokens=20, ignore_eos=True) for i in range(20)
        ]
    plain = generate_all(engine(tiny_llama), prompts, params)
    for draft in ("qwen2", "llama"):  # another model (many rejections); the same one (all kept)
        spec = SpeculativeConfig(
            method="draft", draft_model=str(tiny_models[draft].hf_dir), num_speculative_tokens=3, disable_batch_size=0
        )
        llm = engine(tiny_llama, spec, max_num_batched_tokens=64)  # small budget: guesses get cut too
        assert generate_all(llm, prompts, params) == plain, draft
        s = llm.engine.stats
        assert s.spec_num_draft_tokens > 0
        if draft == "llama":
            assert s.spec_acceptance_rate > 0.95
        else:
            assert s.spec_acceptance_rate < 0.9


@pytest.mark.slow
def test_stop_strings_logprobs_and_max_tokens_hold_under_speculation(tiny_llama):
    prompt = identity_prompts(1)[0]
    ngram = SpeculativeConfig(method="ngram", num_speculative_tokens=4, disable_batch_size=0)
    plain, fast = engine(tiny_llama), engine(tiny_llama, ngram)
    full = plain.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2))[0]
    stop = full.text[9:13]
    for kw in (dict(stop=[stop]), dict(max_tokens=7), dict(logprobs=2), dict(stop_token_ids=[full.token_ids[5]])):
        params = SamplingParams(**{**dict(temperature=0, max_tokens=40, ignore_eos=True), **kw})
        a, b = plain.generate(prompt, params)[0], fast.generate(prompt, params)[0]
        assert (b.text, b.token_ids, b.samples[0].finish_reason) == (a.text, a.token_ids, a.samples[0].finish_reason)
        if "logprobs" in kw:
            for x, y in zip(a.samples[0].logprobs, b.samples[0].logprobs, strict=True):
                assert x.top[0][0] == y.top[0][0] and abs(x.logprob - y.logprob) < 1e-4
    assert fast.engine.stats.spec_num_accepted_tokens > 0


def homogeneity_chi2(a: Counter, b: Counter) -> tuple[float, int]:
    """Two-sample chi-square over the categories, rare ones pooled; returns (statistic, dof)."""
    na, nb = sum(a.values()), sum(b.values())
    cats, pooled = [], (0, 0)
    for c in set(a) | set(b):
        if a[c] + b[c] >= 10:
            cats.append((a[c], b[c]))
        else:
            pooled = (pooled[0] + a[c], pooled[1] + b[c])
    if sum(pooled):
        cats.append(pooled)
    stat = 0.0
    for x, y in cats:
        total = x + y
        for obs, n in ((x, na), (y, nb)):
            exp = total * n / (na + nb)
            stat += (obs - exp) ** 2 / exp
    return stat, len(cats) - 1


def chi2_critical_999(dof: int) -> float:
    """The 0.999 quantile of chi-square with dof degrees of freedom (Wilson-Hilferty, within 1%)."""
    z = 3.0902  # the 0.999 quantile of the standard normal
    return dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3


@pytest.mark.slow
def test_sampled_tokens_keep_their_distribution_with_a_draft_model(tiny_models, tiny_llama):
    prompt = "the river city stone"
    params = SamplingParams(temperature=1.0, top_k=4, max_tokens=3, ignore_eos=True)
    spec = SpeculativeConfig(
        method="draft", draft_model=str(tiny_models["qwen2"].hf_dir), num_speculative_tokens=2, disable_batch_size=0
    )
    counts = []
    for cfg in (None, spec):
        llm = engine(tiny_llama, cfg)
        runs = generate_all(llm, [prompt] * 1500, params)
        counts.append([Counter(r[i] for r in runs) for i in (1, 2)])  # tokens 2 and 3 are verified guesses
        if cfg is not None:
            assert llm.engine.stats.spec_num_draft_tokens > 1000
            assert 0.05 < llm.engine.stats.spec_acceptance_rate < 0.95  # both branches taken
    for position in (0, 1):
        stat, dof = homogeneity_chi2(counts[0][position], counts[1][position])
        assert stat < chi2_critical_999(dof), (position, stat, dof)


def test_a_draft_with_another_vocabulary_is_refused_at_startup(tmp_path, tiny_models, tiny_llama):
    from tiny_models import build_tiny_model

    other = build_tiny_model("llama", tmp_path, vocab_size=300)
    assert other.config.vocab_size != tiny_llama.spec.vocab_size
    spec = SpeculativeConfig(method="draft", draft_model=str(other.hf_dir))
    with pytest.raises(LadleError, match="different tokenizer"):
        engine(tiny_llama, spec)


@pytest.mark.slow
@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_constrained_outputs_are_the_tokens_of_plain_constrained_decoding(tiny_models, tiny_llama, seeded):
    """The row that checks a guess is masked in the grammar's state after the guesses before it,
    and the matcher is rolled back: draft (many rejections, all kept) and n-gram speculation give
    the tokens of plain constrained decoding, and every output matches its constraint."""
    import json
    import re

    from ladle.sample.params import StructuredOutput

    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
              "b": {"enum": ["x", "yy"]}}, "required": ["a", "b"], "additionalProperties": False}  # fmt: skip
    constraints = [StructuredOutput("regex", "[a-z ]{10,30}"), StructuredOutput("json", json.dumps(schema))]
    prompts = identity_prompts()
    temperature = 0.9 if seeded else 0.0
    params = [SamplingParams(temperature=temperature, seed=i, max_tokens=60, structured=constraints[i % 2])
              for i in range(len(prompts))]  # fmt: skip
    plain = generate_all(engine(tiny_llama), prompts, params)
    texts = [tiny_llama.tokenizer.decode(t) for t in plain]
    for i, text in enumerate(texts):
        assert re.fullmatch("[a-z ]{10,30}", text) if i % 2 == 0 else json.loads(text)["b"] in ("x", "yy"), text
    for spec in (
        SpeculativeConfig(method="draft", draft_model=str(tiny_models["qwen2"].hf_dir), num_speculative_tokens=3,
                          disable_batch_size=0),
        SpeculativeConfig(method="draft", draft_model=str(tiny_models["llama"].hf_dir), num_speculative_tokens=3,
                          disable_batch_size=0),
        SpeculativeConfig(method="ngram", num_speculative_tokens=3, ngram_min=1, disable_batch_size=0),
    ):  # fmt: skip
        llm = engine(tiny_llama, spec, max_num_batched_tokens=64)
        assert generate_all(llm, prompts, params) == plain, spec
        assert llm.engine.stats.spec_num_draft_tokens > 0, spec
