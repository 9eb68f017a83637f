"""Structured outputs over HTTP with the official client: response_format json_schema and
json_object on chat, vLLM's structured_outputs on completions and chat, streamed and not; bad
constraints get 400 naming the field, and the server goes on serving."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from openai import BadRequestError, OpenAI

pytestmark = pytest.mark.slow
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
          "population": {"type": "integer", "minimum": 0, "maximum": 50000000},
          "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 2}},
          "required": ["city", "population"], "additionalProperties": False}  # fmt: skip
ASK = [{"role": "user", "content": "Describe Paris as JSON."}]
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def client(embedded_server):
    return OpenAI(base_url=embedded_server.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_response_format_json_schema(client, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    kwargs = dict(model=MODEL, messages=ASK, response_format=fmt, max_tokens=120, temperature=0.7, seed=5)
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)  # fmt: skip
    else:
        resp = client.chat.completions.create(**kwargs)
        assert resp.choices[0].finish_reason == "stop"
        text = resp.choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)


def test_chat_json_object_and_completions_structured_outputs(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": 'Reply with a JSON object whose key "answer" is "yes".'}],
        response_format={"type": "json_object"}, max_tokens=200, temperature=0,
    )  # fmt: skip
    assert isinstance(json.loads(resp.choices[0].message.content), dict)
    again = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": 'Reply with a JSON object whose key "answer" is "yes".'}],
        response_format={"type": "json_object"}, max_tokens=200, temperature=0,
    )  # fmt: skip  # the prompt's blocks come from the prefix cache; the constraint holds the same
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    assert again.choices[0].message.content == resp.choices[0].message.content
    done = client.completions.create(model=MODEL, prompt="The date today is", max_tokens=20, temperature=1,
                                     extra_body={"structured_outputs": {"regex": r" \d{4}-\d{2}-\d{2}"}})  # fmt: skip
    assert re.fullmatch(r" \d{4}-\d{2}-\d{2}", done.choices[0].text)
    picked = client.completions.create(
        model=MODEL,
        prompt="The best fruit is",
        max_tokens=10,
        n=3,
        temperature=1,
        extra_body={"guided_choice": ["apple", "pear", "plum"]},
    )
    assert len(picked.choices) == 3 and all(c.text in ("apple", "pear", "plum") for c in picked.choices)


@pytest.mark.parametrize(
    "extra, param, fragment",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
         "response_format", "invalid json constraint"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "invalid regex constraint"),
        ({"structured_outputs": {"grammar": "start: missing"}}, "structured_outputs", "invalid grammar constraint"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs", "choice must be a non-empty list"),
        ({"guided_regex": "a+", "structured_outputs": {"choice": ["a"]}}, "guided_regex", "give one output constraint"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "needs json_schema.schema"),
    ],
)  # fmt: skip
def test_bad_constraints_get_400_naming_the_field(client, embedded_server, extra, param, fragment):
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, extra_body=extra)
    error = e.value.body
    assert error["param"] == param and fragment in error["message"], error
    ok = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3)
    assert ok.choices[0].message.role == "assistant"
    assert embedded_server.metric("ladle_http_requests_total", status="500") == 0
