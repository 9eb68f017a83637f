"""/v1/messages errors in Anthropic's format, and its x-api-key header, on the tiny guarded server."""

from __future__ import annotations

import anthropic
import pytest

KEY = {"x-api-key": "sk-test-1"}
HELLO = [{"role": "user", "content": "hi"}]


def anthropic_error(result, status: int, kind: str, *fragments: str):
    got, _, body = result
    assert got == status, body
    assert set(body) == {"type", "error"} and body["type"] == "error"
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind
    for f in fragments:
        assert f in body["error"]["message"], body["error"]["message"]


def test_the_anthropic_client_authenticates_with_x_api_key(guarded_server):
    client = anthropic.Anthropic(base_url=guarded_server.url, api_key="sk-test-2", max_retries=0)
    r = client.messages.create(model="tiny", max_tokens=2, messages=HELLO)
    assert r.stop_reason == ("max_tokens" if r.usage.output_tokens == 2 else "end_turn")  # random weights: EOS may come
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic.Anthropic(base_url=guarded_server.url, api_key="nope", max_retries=0).messages.create(
            model="tiny", max_tokens=2, messages=HELLO
        )
    assert e.value.body["error"]["type"] == "authentication_error" and "x-api-key" in e.value.body["error"]["message"]


@pytest.mark.parametrize(
    "body, fragments",
    [
        ({"model": "tiny", "messages": HELLO}, ["max_tokens", "field required"]),
        ({"model": "tiny", "max_tokens": 0, "messages": HELLO}, ["max_tokens"]),
        ({"model": "tiny", "max_tokens": 5, "messages": []}, ["messages"]),
        ({"model": "tiny", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, ["messages.0.role"]),
        ({"model": "tiny", "max_tokens": 5, "temperature": 1.5, "messages": HELLO}, ["temperature"]),
        ({"model": "tiny", "max_tokens": 5, "stop_sequences": ["a"] * 17, "messages": HELLO}, ["stop_sequences", "16"]),
        ({"model": "tiny", "max_tokens": 5, "top_k": -3, "messages": HELLO}, ["top_k"]),
        (
            {"model": "tiny", "max_tokens": 5,
             "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            ["messages.0.content.0.type", "'image'"],
        ),
        (
            {"model": "tiny", "max_tokens": 5, "tools": [{"name": "f", "input_schema": {"type": "object"}}],
             "tool_choice": {"type": "tool", "name": "g"}, "messages": HELLO},
            ["tool_choice", "'g'"],
        ),
        ({"model": "tiny", "max_tokens": 5, "tools": [{"name": "f"}], "messages": HELLO}, ["tools.0.input_schema"]),
    ],
)  # fmt: skip
def test_bad_requests_are_400s_naming_the_field(guarded_server, body, fragments):
    result = guarded_server.request("POST", "/v1/messages", body, headers=KEY)
    anthropic_error(result, 400, "invalid_request_error", *fragments)


def test_unknown_model_malformed_json_and_count_tokens(guarded_server):
    body = {"model": "claude-x", "max_tokens": 5, "messages": HELLO}
    anthropic_error(
        guarded_server.request("POST", "/v1/messages", body, headers=KEY), 404, "not_found_error", "claude-x"
    )
    anthropic_error(guarded_server.request("POST", "/v1/messages", b"{nope", headers=KEY), 400, "invalid_request_error")
    status, _, counted = guarded_server.request(
        "POST", "/v1/messages/count_tokens", {"model": "tiny", "messages": HELLO}, headers=KEY
    )
    assert status == 200 and set(counted) == {"input_tokens"} and counted["input_tokens"] > 0
    # the OpenAI routes keep OpenAI's format
    status, _, body = guarded_server.request("POST", "/v1/chat/completions", {"model": "claude-x", "messages": HELLO},
                                             headers=KEY)  # fmt: skip
    assert status == 404 and set(body) == {"error"} and body["error"]["param"] == "model"
