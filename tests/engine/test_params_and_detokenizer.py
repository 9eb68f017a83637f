"""Sampling-parameter validation and incremental detokenization (UTF-8, stop strings)."""

from __future__ import annotations

import pytest

from ladle.engine.detokenizer import IncrementalDetokenizer
from ladle.errors import InvalidRequestError
from ladle.sample.params import MAX_STOP_STRINGS, SamplingParams


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"n": 0}, "n"),
        ({"stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"logprobs": 21}, "logprobs"),
        ({"logit_bias": {5: 500}}, "logit_bias"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    ],
)
def test_invalid_values_are_refused_naming_the_parameter(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and param in str(e.value)


def test_vocab_checks_and_normalisation():
    p = SamplingParams(stop="END", top_k=-1, logit_bias={"3": 1})
    assert p.stop == ("END",) and p.top_k == 0 and p.logit_bias == {3: 1.0}
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        SamplingParams(logit_bias={10_000: 1}).check_vocab(100)
    assert SamplingParams(seed=5, n=3).for_sample(2).seed == 7


@pytest.fixture(scope="module")
def tokenizer():
    from tiny_models import train_byte_level_bpe

    return train_byte_level_bpe()


def stream(tokenizer, text: str, params: SamplingParams):
    """Feed the text's tokens one by one; returns (deltas, detokenizer, tokens fed)."""
    detok = IncrementalDetokenizer(tokenizer, params)
    deltas = []
    ids = tokenizer.encode(text).ids
    for n, token in enumerate(ids, 1):
        stopped = detok.add_token(token)
        deltas.append(detok.take_delta(finished=stopped or n == len(ids)))
        if stopped:
            return deltas, detok, n
    return deltas, detok, len(ids)


def test_multibyte_characters_are_never_split(tokenizer):
    text = "a 🎉 b 你好 c"  # the tiny vocabulary spells these byte by byte
    deltas, _, _ = stream(tokenizer, text, SamplingParams())
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert len(tokenizer.encode("🎉").ids) > 1  # really split over tokens


def test_stop_string_across_token_boundaries_is_cut_exactly(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    deltas, detok, fed = stream(tokenizer, text, SamplingParams(stop=["n fox j", "zzz"]))
    assert "".join(deltas) == "The quick brow"
    assert detok.stop_reason == "n fox j"
    assert fed < len(tokenizer.encode(text).ids)  # generation stopped right there


def test_stop_string_kept_when_asked(tokenizer):
    deltas, _, _ = stream(tokenizer, "return 42 and more", SamplingParams(stop=["42"], include_stop_str_in_output=True))
    assert "".join(deltas) == "return 42"


def test_possible_stop_prefix_is_held_back_then_released(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["STOP"]))
    shown = ""
    for token in tokenizer.encode("go ST").ids:
        detok.add_token(token)
        shown += detok.take_delta(finished=False)
    assert shown == "go "  # "ST" might begin "STOP"
    for token in tokenizer.encode("ay").ids:
        detok.add_token(token)
        shown += detok.take_delta(finished=False)
    assert shown == "go STay"
