"""A Messages API request as the chat completion request it runs as."""

from __future__ import annotations

import pytest

from ladle.server.anthropic_api import CountTokensRequest, MessagesRequest, _chat_request
from ladle.server.errors import APIError

TOOL = {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}


def test_system_text_blocks_tool_use_and_tool_result_become_chat_messages():
    body = MessagesRequest.model_validate({
        "model": "m", "max_tokens": 9, "system": [{"type": "text", "text": "Be brief."}], "tools": [TOOL],
        "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Oslo?"}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "-3 C"}]},
                {"type": "text", "text": "And tomorrow?"}]},
        ],
    })  # fmt: skip
    chat = _chat_request(body, max_tokens=body.max_tokens, stop=["\n\n"])
    assert [m.as_template_dict() for m in chat.messages] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "-3 C"},
        {"role": "user", "content": "And tomorrow?"},
    ]  # fmt: skip
    assert chat.tools[0].function.name == "get_weather" and chat.tools[0].function.parameters == {"type": "object"}
    assert chat.tool_choice == {"type": "function", "function": {"name": "get_weather"}}
    assert chat.parallel_tool_calls is False and chat.max_tokens == 9 and chat.stop == ["\n\n"]


@pytest.mark.parametrize("kind, expected", [("auto", "auto"), ("any", "required"), ("none", "none")])
def test_tool_choice_types(kind, expected):
    body = CountTokensRequest.model_validate(
        {"model": "m", "tools": [TOOL], "tool_choice": {"type": kind}, "messages": [{"role": "user", "content": "x"}]}
    )
    assert _chat_request(body).tool_choice == expected


def test_a_block_in_the_wrong_place_is_a_400_naming_it():
    body = CountTokensRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]})  # fmt: skip
    with pytest.raises(APIError) as e:
        _chat_request(body)
    assert e.value.status == 400 and e.value.param == "messages.0.content.0.type"
    assert e.value.anthropic_body()["error"]["type"] == "invalid_request_error"
