"""Tool calling with the official `openai` client against `ladle serve` on the embedded model.

The 135M model rarely calls tools of its own accord, so `auto` is held to what it must do whatever
the model writes (valid calls or plain text, streamed the same as not); `required` and named
choices are enforced by the grammar and must always give calls that parse against the schemas.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from openai import OpenAI

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
           "additionalProperties": False}  # fmt: skip
TIME = {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "JST"]}},
        "required": ["zone"], "additionalProperties": False}  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The current time in a time zone",
                                      "parameters": TIME}},
]  # fmt: skip
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED_TIME = {"type": "function", "function": {"name": "get_time"}}


@pytest.fixture(scope="module")
def client(embedded_server):
    return OpenAI(base_url=embedded_server.url + "/v1", api_key="unused", max_retries=0)


def assert_valid_calls(calls, names=SCHEMAS):
    assert calls
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function" and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def streamed(client, **kwargs):
    """A streamed answer put back together: (content, [(name, arguments)], finish_reason)."""
    content, calls, finish = "", [], None
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kwargs):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or ():
            if d.index == len(calls):  # a call's first delta: its id and name, before any arguments
                assert d.id.startswith("call_") and d.function.name and d.type == "function"
                calls.append([d.function.name, ""])
            else:
                assert d.id is None and d.function.name is None
            calls[d.index][1] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [tuple(c) for c in calls], finish


def as_pairs(message):
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or ()]


def test_auto_with_two_tools_answers_with_valid_calls_or_text_streamed_alike(client):
    kwargs = dict(messages=QUESTION, tools=TOOLS, max_tokens=40, temperature=0)
    r = client.chat.completions.create(model=MODEL, **kwargs)
    message, finish = r.choices[0].message, r.choices[0].finish_reason
    if message.tool_calls:
        assert_valid_calls(message.tool_calls)
        assert finish == "tool_calls"
    else:
        assert message.content and finish in ("stop", "length")
    assert streamed(client, **kwargs) == (message.content or "", as_pairs(message), finish)


@pytest.mark.parametrize("temperature", [0, 1])
def test_required_always_gives_valid_calls(client, temperature):
    for seed in (1, 2):
        r = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required",
                                           max_tokens=200, temperature=temperature, seed=seed)  # fmt: skip
        choice = r.choices[0]
        assert_valid_calls(choice.message.tool_calls)
        assert choice.finish_reason == "tool_calls" and choice.message.content is None


def test_required_streamed_gives_the_same_calls(client):
    kwargs = dict(messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=200, temperature=0)
    r = client.chat.completions.create(model=MODEL, **kwargs)
    assert streamed(client, **kwargs) == ("", as_pairs(r.choices[0].message), "tool_calls")


@pytest.mark.parametrize("temperature", [0, 1])
def test_named_tool_gives_one_call_of_that_tool(client, temperature):
    kwargs = dict(messages=QUESTION, tools=TOOLS, tool_choice=NAMED_TIME, max_tokens=100, temperature=temperature,
                  seed=3)  # fmt: skip
    r = client.chat.completions.create(model=MODEL, **kwargs)
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and r.choices[0].finish_reason == "tool_calls"
    assert_valid_calls(calls, names={"get_time"})
    content, pairs, finish = streamed(client, **kwargs)
    assert len(pairs) == 1 and pairs[0][0] == "get_time" and finish == "tool_calls"
    jsonschema.validate(json.loads(pairs[0][1]), TIME)


def test_one_call_when_parallel_calls_are_off(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=100, temperature=1, seed=4)  # fmt: skip
    assert len(r.choices[0].message.tool_calls) == 1


def test_round_trip_call_result_answer(client, embedded_server):
    first = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           max_tokens=100, temperature=0)  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    conversation = [
        *QUESTION,
        first.choices[0].message.model_dump(exclude_none=True),  # the assistant turn as the client got it
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees Celsius"},
    ]
    # the call and its result reach the model through the template
    status, _, ids = embedded_server.request("POST", "/tokenize", {"messages": conversation, "tools": TOOLS})
    assert status == 200
    _, _, prompt = embedded_server.request("POST", "/detokenize", {"tokens": ids["tokens"]})
    assert "# Tools" in prompt["prompt"] and f'"arguments": {call.function.arguments}' in prompt["prompt"]
    assert "<tool_response>\nSunny, 24 degrees Celsius\n</tool_response>" in prompt["prompt"]
    final = client.chat.completions.create(model=MODEL, messages=conversation, tools=TOOLS, tool_choice="none",
                                           max_tokens=40, temperature=0)  # fmt: skip
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason in ("stop", "length")


def test_unknown_tool_in_tool_choice_is_a_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "get_stock"}})  # fmt: skip
    assert e.value.status_code == 400 and e.value.body["param"] == "tool_choice" and "get_stock" in e.value.message


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tool_choice": "required"}, "tools"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
                "tool_choice": "required",
            },
            "tools",
        ),  # a schema the grammar engine cannot read
    ],
)
def test_bad_tools_are_400s_naming_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5, **extra)
    assert e.value.body["param"] == param


@pytest.fixture(scope="module")
def llama3_client():
    """The embedded model told to write Llama 3.x's JSON calls (--tool-call-parser)."""
    from helpers import ServerProcess

    server = ServerProcess("--max-model-len", "1024", "--kv-cache-memory", "0.2", "--tool-call-parser", "llama3_json")
    yield OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0), server
    server.stop()


def test_the_llama3_json_parser_chosen_by_flag_prompts_constrains_and_reads_its_format(llama3_client):
    client, server = llama3_client
    _, _, ids = server.request("POST", "/tokenize", {"messages": QUESTION, "tools": TOOLS})
    _, _, prompt = server.request("POST", "/detokenize", {"tokens": ids["tokens"]})
    assert '"parameters": dictionary of argument name' in prompt["prompt"] and "<tool_call>" not in prompt["prompt"]
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required",
                                       max_tokens=200, temperature=1, seed=5)  # fmt: skip
    assert_valid_calls(r.choices[0].message.tool_calls)
    content, pairs, finish = streamed(client, messages=QUESTION, tools=TOOLS, tool_choice=NAMED_TIME, max_tokens=100,
                                      temperature=0)  # fmt: skip
    assert content == "" and [name for name, _ in pairs] == ["get_time"] and finish == "tool_calls"
    jsonschema.validate(json.loads(pairs[0][1]), TIME)
