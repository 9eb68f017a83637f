"""A chat request's tools: tool_choice checked against them, how they and earlier calls render
through a template that knows tools and through one that does not (the embedded model's)."""

from __future__ import annotations

import json

import pytest

from ladle.model.chat_template import ChatTemplate
from ladle.server.errors import APIError
from ladle.server.protocol import ChatCompletionRequest
from ladle.server.tool_parsers import HermesToolParser
from ladle.server.tools import ToolPlan

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time"}},
]  # fmt: skip
CONVERSATION = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
]  # fmt: skip
SMOLLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# the shape of Qwen2.5's template: tools in the system turn, calls and results in its own tags
TOOLS_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'tool' %}[result {{ m.tool_call_id }}: {{ m.content }}]"
    "{% elif m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function.name }} "
    "{{ c.function.arguments | tojson }}</tool_call>{% endfor %}{% else %}{{ m.role }}: {{ m.content }}\n"
    "{% endif %}{% endfor %}"
)


def plan_for(template: str, tool_choice=None, tools=TOOLS) -> ToolPlan:
    body = ChatCompletionRequest(messages=CONVERSATION, tools=tools, tool_choice=tool_choice)
    return ToolPlan.build(body.tools, body.tool_choice, body.parallel_tool_calls, "auto", template)


def render(template: str, tool_choice=None) -> str:
    body = ChatCompletionRequest(messages=CONVERSATION, tools=TOOLS)
    messages, variables = plan_for(template, tool_choice).render([m.as_template_dict() for m in body.messages])
    return ChatTemplate(template).render(messages, add_generation_prompt=True, **variables)


def test_a_template_that_knows_tools_gets_them_and_the_calls_as_mappings():
    text = render(TOOLS_TEMPLATE)
    assert text.startswith("<tools>") and '"name": "get_weather"' in text and '"name": "get_time"' in text
    assert '<tool_call>get_weather {"city": "Oslo"}</tool_call>' in text  # arguments as a mapping, not a string
    assert "[result call_1: -3 C]" in text


def test_a_template_without_tools_gets_them_in_the_parsers_format():
    text = render(SMOLLM_TEMPLATE)
    # the tools as a system block that says how to call them (the template's default system prompt gives way)
    assert text.startswith("<|im_start|>system\n# Tools\n") and "You are a helpful" not in text
    assert json.dumps(plan_for(SMOLLM_TEMPLATE).functions[0].as_openai()) in text
    # the earlier call as the model writes one, the result as a user turn in the family's tags
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert f"<|im_start|>assistant\n{call}<|im_end|>" in text
    assert "<|im_start|>user\n<tool_response>\n-3 C\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_tool_choice_none_offers_no_tools_and_reads_no_calls():
    text = render(SMOLLM_TEMPLATE, "none")
    assert "# Tools" not in text and "<tool_call>" in text  # the conversation's own call still renders
    plan = plan_for(SMOLLM_TEMPLATE, "none")
    output = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert plan.read(output) == (output, []) and plan.structured() is None


def test_required_and_named_choices_carry_a_grammar_auto_none():
    assert plan_for(SMOLLM_TEMPLATE).structured() is None
    required = plan_for(SMOLLM_TEMPLATE, "required").structured()
    named = plan_for(SMOLLM_TEMPLATE, {"type": "function", "function": {"name": "get_time"}}).structured()
    assert required.kind == named.kind == "grammar" and required.param == "tools"
    assert '"get_weather' in required.spec and '"get_time' in required.spec
    assert '"get_time' in named.spec and "get_weather" not in named.spec
    assert isinstance(plan_for(SMOLLM_TEMPLATE).parser, HermesToolParser)


@pytest.mark.parametrize(
    "tool_choice, tools, param, fragment",
    [
        ({"type": "function", "function": {"name": "nope"}}, TOOLS, "tool_choice", "'nope'"),
        ("sometimes", TOOLS, "tool_choice", "none, auto, required"),
        ({"name": "get_time"}, TOOLS, "tool_choice", '{"type": "function"'),
        ("required", None, "tools", "needs tools"),
        ({"type": "function", "function": {"name": "get_time"}}, None, "tool_choice", "offered: none"),
        (None, [TOOLS[1], TOOLS[1]], "tools.1.function.name", "offered twice"),
    ],
)
def test_bad_tool_choice_names_the_field(tool_choice, tools, param, fragment):
    with pytest.raises(APIError) as e:
        plan_for(SMOLLM_TEMPLATE, tool_choice, tools)
    assert e.value.status == 400 and e.value.param == param and fragment in e.value.message


def test_malformed_earlier_call_names_the_field():
    bad = [{**CONVERSATION[1], "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]
    plan = plan_for(SMOLLM_TEMPLATE)
    with pytest.raises(APIError) as e:
        plan.render(bad)
    assert e.value.param == "messages.0.tool_calls.0.function.arguments"
