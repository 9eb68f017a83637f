"""The sampler through the whole engine (a tiny model) and alone (crafted logits)."""

from __future__ import annotations

import pytest
import torch

from ladle.engine.llm import LLM
from ladle.sample.params import SampleSpec, SamplingParams
from ladle.sample.sampler import Sampler

PROMPTS = ["The quick brown fox", "def main(): return", "Paris is the capital", "x = [1, 2, 3]", "lazy dog"]


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(str(tiny_models["llama"].hf_dir), dtype="float32", device="cpu", kv_cache_memory_gib=0.05, seed=1)


def one(llm, prompt, **kw):
    return llm.generate(prompt, SamplingParams(**kw))[0]


def test_a_seed_reproduces_its_text_inside_different_batches(llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=24)
    alone = llm.generate(PROMPTS[0], seeded)[0].token_ids
    noise = [SamplingParams(temperature=t, top_p=0.9, max_tokens=m) for t, m in [(1.3, 5), (0.7, 30), (1.0, 12)]]
    batch = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[3]], [noise[0], seeded, noise[1], noise[2]])
    assert batch[1].token_ids == alone
    other_seed = llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, seed=99, max_tokens=24))[0].token_ids
    assert other_seed != alone


def test_top_k_one_equals_greedy(llm):
    greedy = [r.token_ids for r in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16))]
    top1 = [r.token_ids for r in llm.generate(PROMPTS, SamplingParams(temperature=1.5, top_k=1, max_tokens=16))]
    assert top1 == greedy


def test_stop_strings_cut_exactly(llm):
    full = one(llm, PROMPTS[2], temperature=0, max_tokens=40, ignore_eos=True)
    text = full.text
    stop = text[7:12]  # five characters: they rarely line up with token boundaries
    at = text.index(stop)
    cut = one(llm, PROMPTS[2], temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])
    assert cut.text == text[:at]
    assert cut.samples[0].finish_reason == "stop" and cut.samples[0].stop_reason == stop
    kept = one(
        llm, PROMPTS[2], temperature=0, max_tokens=40, ignore_eos=True, stop=[stop], include_stop_str_in_output=True
    )
    assert kept.text == text[: at + len(stop)]


def test_stop_token_ids_end_the_output(llm):
    full = one(llm, PROMPTS[1], temperature=0, max_tokens=20, ignore_eos=True).token_ids
    stop_id = full[3]
    first = full.index(stop_id)
    out = one(llm, PROMPTS[1], temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_id])
    assert out.token_ids == full[: first + 1]
    assert out.samples[0].finish_reason == "stop" and out.samples[0].stop_reason == stop_id


def test_eos_min_tokens_and_ignore_eos(llm):
    eos = llm.tokenizer.eos_token_id
    forced = {eos: 100.0}
    assert one(llm, PROMPTS[0], temperature=0, max_tokens=10, logit_bias=forced).token_ids == [eos]
    late = one(llm, PROMPTS[0], temperature=0, max_tokens=10, logit_bias=forced, min_tokens=4).token_ids
    assert len(late) == 5 and late[-1] == eos and eos not in late[:-1]
    ignored = one(llm, PROMPTS[0], temperature=0, max_tokens=6, logit_bias=forced, ignore_eos=True)
    assert ignored.token_ids == [eos] * 6 and ignored.samples[0].finish_reason == "length"


def test_logit_bias_steers_the_choice(llm):
    out = one(llm, PROMPTS[3], temperature=0, max_tokens=5, logit_bias={42: 100.0})
    assert out.token_ids == [42] * 5


def test_logprobs_match_a_reference_log_softmax(llm, tiny_models):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_models["llama"].hf_dir, dtype=torch.float32).eval()
    prompt_ids = llm.tokenizer.encode(PROMPTS[4])
    out = llm.generate([prompt_ids], SamplingParams(temperature=0.8, seed=5, max_tokens=8, logprobs=5))[0]
    ids = prompt_ids + out.token_ids
    with torch.no_grad():
        ref_lp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), dim=-1)
    for i, (token, lp) in enumerate(zip(out.token_ids, out.samples[0].logprobs, strict=True)):
        row = ref_lp[len(prompt_ids) - 1 + i]
        assert lp.logprob == pytest.approx(row[token].item(), abs=1e-4)
        top_ids = [t for t, _ in lp.top]
        assert top_ids == row.topk(5).indices.tolist()
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        assert sum(torch.tensor([v for _, v in lp.top]).exp().tolist()) <= 1.0 + 1e-5


def test_n_samples_share_the_prompt_and_differ(llm):
    prompt = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)
    result = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12))[0]
    assert len(result.samples) == 3
    assert len({tuple(s.token_ids) for s in result.samples}) > 1
    again = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12))[0]
    assert [s.token_ids for s in again.samples] == [s.token_ids for s in result.samples]
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks


# -- the sampler alone ---------------------------------------------------------------------------


def spec(**kw) -> SampleSpec:
    return SampleSpec(SamplingParams(**kw), prompt_token_ids=[], output_token_ids=[])


def test_penalties_follow_their_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    s = SampleSpec(
        SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        prompt_token_ids=[1],
        output_token_ids=[3, 3, 0],
    )
    adjusted = Sampler()._adjust(logits.clone(), [s])
    # token 0: once in the output: 2 - 0.5 - 0.25 = 1.25, then > 0 so / 2
    # token 1: in the prompt only: -1 * 2; token 2: unseen; token 3: twice: 3 - 1 - 0.25 = 1.75, / 2
    assert adjusted.tolist() == [[0.625, -2.0, 0.5, 0.875]]


def test_top_p_top_k_min_p_keep_the_right_tokens():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    sampler = Sampler(seed=0)
    for kw, allowed in [
        ({"top_p": 0.7}, {0, 1}),
        ({"top_k": 3}, {0, 1, 2}),
        ({"min_p": 0.25}, {0, 1, 2}),
        ({"top_p": 0.4}, {0}),
    ]:
        seen = {int(sampler(logits, [spec(temperature=1.0, **kw)]).token_ids) for _ in range(300)}
        assert seen == allowed, kw


def test_temperature_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = (probs.log() * 2).repeat(4000, 1)  # temperature 2 undoes the doubling
    tokens = Sampler(seed=3)(logits, [spec(temperature=2.0)] * 4000).token_ids
    counts = torch.bincount(tokens, minlength=4).float()
    expected = probs * 4000
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 16.27  # p = 0.001 with 3 degrees of freedom


def test_a_draw_never_picks_a_token_of_probability_zero():
    """The inverse-CDF draw at both ends of the vocabulary and between kept tokens, at uniforms
    from 0 to the largest below 1."""
    probs = torch.zeros(3, 50)
    probs[0, 1] = 1.0  # one token, after a zero at the front
    probs[1, [10, 30]] = torch.tensor([1e-30, 2.0])  # a tiny one beside a large one
    probs[2, 49] = 3.0  # the last token only
    sampler = Sampler(seed=1)
    g = torch.Generator().manual_seed(5)
    edges = [0.0, 1e-300, 0.5, 1 - 2**-53]
    for i in range(200):
        u = torch.rand(3, 1, dtype=torch.float64, generator=g)
        if i < len(edges):
            u.fill_(edges[i])
        tokens = sampler._draw(probs, u).tolist()
        assert tokens[0] == 1 and tokens[1] in (10, 30) and tokens[2] == 49


def test_grammar_masks_set_exactly_the_disallowed_tokens_to_minus_infinity():
    """apply_masks against the bits read one by one: rows chosen, the others untouched."""
    from ladle.sample.sampler import apply_masks

    gen = torch.Generator().manual_seed(0)
    vocab = 100  # not a multiple of 32: the last word's high bits are ignored
    logits = torch.randn(3, vocab, generator=gen)
    masks = torch.randint(-(2**31), 2**31 - 1, (2, (vocab + 31) // 32), dtype=torch.int32, generator=gen)
    before = logits.clone()
    apply_masks(logits, [0, 2], masks)
    for row, mask in ((0, masks[0]), (2, masks[1])):
        for t in range(vocab):
            allowed = (int(mask[t // 32]) >> (t % 32)) & 1
            assert logits[row, t] == (before[row, t] if allowed else float("-inf"))
    assert torch.equal(logits[1], before[1])
    full = before[[0, 2]].clone()
    apply_masks(full, [0, 1], masks)  # every row: the add without an index
    assert torch.equal(full[0], logits[0]) and torch.equal(full[1], logits[2])
