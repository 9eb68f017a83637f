"""The official `openai` client against `ladle serve` on the embedded model."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(embedded_server):
    return OpenAI(base_url=embedded_server.url + "/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_models(client):
    models = client.models.list()
    assert [m.id for m in models] == [MODEL, "all-MiniLM-L6-v2"]  # make serve: the LLM and the embedding model


def test_chat_completion(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=30, temperature=0)
    choice = r.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert r.usage.prompt_tokens > 20 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"


def test_streaming_chat_equals_non_streaming_and_reports_usage(client):
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=30, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=30,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, roles = "", None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        delta = chunk.choices[0].delta
        roles.append(delta.role)
        text += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert roles[0] == "assistant"
    assert text == full.choices[0].message.content
    assert finish == "stop"
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_streaming_and_not(client):
    full = client.completions.create(model=MODEL, prompt="The three primary colors are", max_tokens=12, temperature=0)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 12
    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="The three primary colors are", max_tokens=12, temperature=0, stream=True
        )
        if c.choices
    ]
    assert "".join(pieces) == full.choices[0].text


def test_n_samples_with_a_seed(client):
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Name an animal."}],
        max_tokens=12,
        n=2,
        temperature=1.0,
        seed=42,
    )
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert 2 <= a.usage.completion_tokens <= 24  # both samples count, each at most max_tokens
    # and again among other traffic: whatever shares its steps, the same text
    with ThreadPoolExecutor(8) as pool:
        others = [
            pool.submit(client.completions.create, model=MODEL, prompt=f"Story {i}:", max_tokens=40, temperature=0.7)
            for i in range(7)
        ]
        c = pool.submit(client.chat.completions.create, **kw).result()
        assert all(o.result().usage.completion_tokens > 0 for o in others)
    assert [x.message.content for x in c.choices] == [x.message.content for x in a.choices]


def test_streaming_n_two(client):
    stream = client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=6,
        n=2,
        stream=True,
        temperature=1.0,
        seed=1,
        stream_options={"include_usage": True},
    )
    texts = {0: "", 1: ""}
    usage = None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts[0] and texts[1]
    assert usage.completion_tokens == 12


def test_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        assert item.token == item.top_logprobs[0].token  # greedy picks the best
    c = client.completions.create(model=MODEL, prompt="Paris is", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == c.choices[0].text


def test_stop_strings_and_echo(client):
    full = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=12, temperature=0)
    assert " 5," in full.choices[0].text
    cut = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=12, temperature=0, stop=[" 5,"])
    assert cut.choices[0].text == full.choices[0].text.split(" 5,")[0]
    assert cut.choices[0].finish_reason == "stop"
    echo = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=3, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("1, 2, 3,")


def test_request_id_travels_both_ways(embedded_server):
    status, headers, body = embedded_server.request(
        "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2}, headers={"X-Request-Id": "trace-123"}
    )
    assert status == 200
    assert headers["x-request-id"] == "trace-123" and body["id"] == "cmpl-trace-123"
    status, headers, _ = embedded_server.request("GET", "/v1/models")
    assert len(headers["x-request-id"]) == 32  # generated when the client sends none


def test_tokenize_and_detokenize(embedded_server):
    status, _, body = embedded_server.request("POST", "/tokenize", {"prompt": "Hello world"})
    assert status == 200 and body["count"] == len(body["tokens"]) and body["max_model_len"] == 2048
    status, _, back = embedded_server.request("POST", "/detokenize", {"tokens": body["tokens"]})
    assert back["prompt"] == "Hello world"
    status, _, chat = embedded_server.request("POST", "/tokenize", {"messages": QUESTION})
    assert chat["count"] > body["count"]
