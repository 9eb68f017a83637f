"""The official `anthropic` client against `ladle serve` on the embedded model: /v1/messages
streamed and not, stop reasons, usage, tools with tool_use / tool_result blocks, count_tokens.
(This client's create() no longer takes temperature: it goes in extra_body, as the API still
reads it.)"""

from __future__ import annotations

import json

import anthropic
import jsonschema
import pytest

from helpers import open_stream

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
GREEDY = {"temperature": 0}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
           "additionalProperties": False}  # fmt: skip
TOOLS = [
    {"name": "get_weather", "description": "The current weather in a city", "input_schema": WEATHER},
    {"name": "get_time", "description": "The current time in a time zone",
     "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}},
]  # fmt: skip


@pytest.fixture(scope="module")
def client(embedded_server):
    return anthropic.Anthropic(base_url=embedded_server.url, api_key="unused", max_retries=0)


def test_message_with_system_prompt_and_usage(client):
    kwargs = dict(model=MODEL, max_tokens=40, system="You answer in one short sentence.", messages=QUESTION)
    r = client.messages.create(**kwargs, extra_body=GREEDY)
    assert r.type == "message" and r.role == "assistant" and r.model == MODEL and r.id.startswith("msg_")
    assert [b.type for b in r.content] == ["text"] and "Paris" in r.content[0].text
    assert r.stop_reason == "end_turn" and r.stop_sequence is None
    counted = client.messages.count_tokens(model=MODEL, system=kwargs["system"], messages=QUESTION)
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == counted.input_tokens > 10
    assert r.usage.output_tokens > 0


def test_max_tokens_and_stop_sequences(client):
    r = client.messages.create(model=MODEL, max_tokens=3, messages=QUESTION, extra_body=GREEDY)
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens == 3
    full = client.messages.create(model=MODEL, max_tokens=40, messages=QUESTION, extra_body=GREEDY).content[0].text
    word = full.split()[3]
    r = client.messages.create(model=MODEL, max_tokens=40, messages=QUESTION, stop_sequences=[word], extra_body=GREEDY)
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == word
    assert full.startswith(r.content[0].text) and word not in r.content[0].text


def test_streaming_gives_the_same_message(client):
    kwargs = dict(model=MODEL, max_tokens=40, messages=QUESTION, extra_body=GREEDY)
    full = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == full.content[0].text == final.content[0].text
    assert final.stop_reason == full.stop_reason and final.usage.output_tokens == full.usage.output_tokens


def test_stream_events_in_anthropics_order(embedded_server):
    body = {"model": MODEL, "max_tokens": 5, "messages": QUESTION, "temperature": 0}
    conn, resp = open_stream(embedded_server, "/v1/messages", body)
    names, datas = [], []
    for line in resp.read().decode().splitlines():
        if line.startswith("event: "):
            names.append(line[7:])
        elif line.startswith("data: "):
            datas.append(json.loads(line[6:]))
    conn.close()
    assert [d["type"] for d in datas] == names  # each event's name is its data's type
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert datas[-2]["delta"]["stop_reason"] == "max_tokens" and datas[-2]["usage"]["output_tokens"] == 5


def test_tools_any_gives_tool_use_blocks_that_match_the_schemas(client):
    for temperature in (0, 1):
        question = [{"role": "user", "content": "Weather in Rome?"}]
        r = client.messages.create(model=MODEL, max_tokens=200, messages=question, tools=TOOLS,
                                   tool_choice={"type": "any"}, extra_body={"temperature": temperature})  # fmt: skip
        uses = [b for b in r.content if b.type == "tool_use"]
        assert uses and r.stop_reason == "tool_use"
        for block in uses:
            assert block.id.startswith("toolu_") and block.name in ("get_weather", "get_time")
            jsonschema.validate(block.input, next(t["input_schema"] for t in TOOLS if t["name"] == block.name))


def test_named_tool_streamed_and_round_trip(client):
    question = [{"role": "user", "content": "What is the weather in Rome?"}]
    with client.messages.stream(
        model=MODEL,
        max_tokens=100,
        messages=question,
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body=GREEDY,
    ) as stream:
        final = stream.get_final_message()  # fmt: skip
    assert [b.type for b in final.content] == ["tool_use"] and final.stop_reason == "tool_use"
    use = final.content[0]
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, WEATHER)
    conversation = [
        *question,
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 24 C"}]},
    ]
    with_result = client.messages.count_tokens(model=MODEL, messages=conversation, tools=TOOLS)
    without = client.messages.count_tokens(model=MODEL, messages=question, tools=TOOLS)
    assert with_result.input_tokens > without.input_tokens + 10  # the call and its result are in the prompt
    answer = client.messages.create(model=MODEL, max_tokens=40, messages=conversation, tools=TOOLS,
                                    tool_choice={"type": "none"}, extra_body=GREEDY)  # fmt: skip
    assert [b.type for b in answer.content] == ["text"] and answer.content[0].text
    assert answer.stop_reason in ("end_turn", "max_tokens")


def test_count_tokens_counts_the_tools(client):
    plain = client.messages.count_tokens(model=MODEL, messages=QUESTION)
    with_tools = client.messages.count_tokens(model=MODEL, messages=QUESTION, tools=TOOLS)
    assert with_tools.input_tokens > plain.input_tokens + 40


def test_unknown_tool_is_a_400_in_anthropics_format(client):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=MODEL, max_tokens=10, messages=QUESTION, tools=TOOLS,
                               tool_choice={"type": "tool", "name": "get_stock"})  # fmt: skip
    assert e.value.status_code == 400
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    assert "tool_choice" in e.value.body["error"]["message"] and "get_stock" in e.value.body["error"]["message"]
