"""Constrained decoding on the embedded model: every constrained output parses and validates,
greedy and sampled, batched with unconstrained requests (whose tokens stay what they are alone),
with and without n-gram speculation; n > 1; bad constraints refused naming the field."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from ladle.bench.structured import CHOICES, REGEXES, json_schemas
from ladle.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
from ladle.engine.llm import LLM
from ladle.errors import InvalidRequestError
from ladle.sample.params import SamplingParams, StructuredOutput

pytestmark = pytest.mark.slow
PLAIN = ["The capital of France is", "def add(a, b):", "Once upon a time"]


def engine(loaded, spec: SpeculativeConfig | None = None) -> LLM:
    config = EngineConfig(
        model=ModelConfig(dtype="float32", device="cpu", max_model_len=1024),
        cache=CacheConfig(kv_cache_memory_gib=0.5),
        scheduler=SchedulerConfig(max_num_seqs=128, max_num_batched_tokens=4096),
        speculative=spec or SpeculativeConfig(),
    )
    return LLM(config=config, loaded=loaded)


def chat(llm: LLM, text: str) -> list[int]:
    return llm.tokenizer.encode_chat([{"role": "user", "content": text}])


def cases():
    """(prompt text, constraint, check(text) -> bool) for every schema, regex and choice."""
    out = []
    for schema in json_schemas():
        keys = ", ".join(schema.get("properties", {})) or "the values"
        out.append((f"Reply with JSON giving {keys}.", StructuredOutput("json", json.dumps(schema)), schema))
    for pattern in REGEXES:
        out.append((f"Give an example matching {pattern}.", StructuredOutput("regex", pattern), pattern))
    for choice in CHOICES:
        out.append((f"Pick one of {', '.join(choice)}.", StructuredOutput("choice", json.dumps(choice)), choice))
    return out


def check(constraint: StructuredOutput, expected, text: str) -> None:
    if constraint.kind in ("json", "json_object"):
        jsonschema.validate(json.loads(text), expected)
    elif constraint.kind == "regex":
        assert re.fullmatch(expected, text), (expected, text)
    else:
        assert text in expected, (expected, text)


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "ngram"])
def test_every_constrained_output_validates_and_the_neighbours_do_not_change(embedded_fp32, speculative):
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=4, disable_batch_size=0) if speculative else None
    llm = engine(embedded_fp32, spec)
    plain = [SamplingParams(temperature=0, max_tokens=24) for _ in PLAIN]
    alone = [r.token_ids for r in llm.generate(PLAIN, plain)]
    all_cases = cases()
    prompts, params = [], []
    for temperature in (0.0, 1.0):
        for i, (text, constraint, _) in enumerate(all_cases):
            prompts.append(chat(llm, text))
            params.append(SamplingParams(temperature=temperature, seed=i, max_tokens=400, structured=constraint))
    prompts += [llm.tokenizer.encode(p) for p in PLAIN]
    params += plain
    results = llm.generate(prompts, params)
    for result, (_, constraint, expected) in zip(results, all_cases * 2, strict=False):
        assert result.samples[0].finish_reason == "stop", (constraint, result.text)
        check(constraint, expected, result.text)
    assert [r.token_ids for r in results[-len(PLAIN) :]] == alone
    if speculative:
        assert llm.engine.stats.spec_num_accepted_tokens > 0  # guesses were checked against the grammar
    assert llm.engine.grammars.num_compiled == len(all_cases)  # the second temperature hit the cache


def test_any_json_object(embedded_fp32):
    """json_object bounds nothing (a model may add keys until max_tokens): a prompt that asks for
    one key, greedy, ends in an object that parses."""
    llm = engine(embedded_fp32)
    params = SamplingParams(temperature=0, max_tokens=200, structured=StructuredOutput("json_object"))
    (result,) = llm.generate([chat(llm, 'Reply with a JSON object whose key "answer" is "yes".')], params)
    assert result.samples[0].finish_reason == "stop" and isinstance(json.loads(result.text), dict), result.text


def test_n_samples_each_follow_the_constraint(embedded_fp32):
    llm = engine(embedded_fp32)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
              "rank": {"type": "integer", "minimum": 1, "maximum": 10}}, "required": ["city", "rank"],
              "additionalProperties": False}  # fmt: skip
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=60,
                            structured=StructuredOutput("json", json.dumps(schema)))  # fmt: skip
    (result,) = llm.generate([chat(llm, "Name a city and its rank as JSON.")], params)
    texts = [s.text for s in result.samples]
    assert len(texts) == 4 and all(s.finish_reason == "stop" for s in result.samples)
    for text in texts:
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize(
    "constraint, fragment",
    [
        (StructuredOutput("json", '{"type": "object", "properties": {"a": {"type": "wat"}}}'), "invalid json"),
        (StructuredOutput("json", "not json"), "invalid json"),
        (StructuredOutput("regex", "(unclosed"), "invalid regex"),
        (StructuredOutput("choice", "[]"), "choice must be a non-empty list"),
        (StructuredOutput("grammar", "start: undefined_rule"), "invalid grammar"),
    ],
)
def test_a_constraint_the_library_rejects_is_an_error_naming_the_field(embedded_fp32, constraint, fragment):
    llm = engine(embedded_fp32)
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([chat(llm, "hi")], SamplingParams(max_tokens=4, structured=constraint))
    assert fragment in str(e.value) and e.value.param == "structured_outputs"
    assert not llm.engine.has_unfinished()
