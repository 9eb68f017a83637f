"""Tool calling on chat requests: how a request's `tools` and `tool_choice` reach the model, what
constrains its output, and how the output reads back (the family's format: tool_parsers.py).

- The tools reach the model through its chat template (`tools=`). A template that never reads
  `tools` (the embedded SmolLM2's) gets them as a system-prompt block in the parser's own format,
  as llama.cpp does for such templates; likewise assistant `tool_calls` are written into the
  turn's text as the model would write them, and `role: tool` results become user turns, where the
  template knows neither.
- `tool_choice`: `none` offers no tools and reads no calls (OpenAI: the model answers in text; the
  conversation's earlier calls still render). `auto` offers them and reads calls from free output.
  `required` and a named function constrain the output with a grammar (SamplingParams.structured)
  that admits only calls of the offered functions (of the named one, once), whose arguments match
  the function's parameters schema.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ladle.sample.params import StructuredOutput
from ladle.server.errors import APIError
from ladle.server.tool_parsers import FunctionSpec, ParsedCall, ToolParser, parser_for

_MODES = ("none", "auto", "required")


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # "none", "auto", "required" or "function" (the one named)
    name: str | None = None  # mode "function": the function that must be called


def read_tool_choice(tool_choice: Any, functions: list[FunctionSpec]) -> ToolChoice:
    """The request's tool_choice, checked against its tools (a 400 naming the field where wrong)."""
    if tool_choice is None:
        return ToolChoice("auto" if functions else "none")
    if isinstance(tool_choice, str):
        if tool_choice not in _MODES:
            raise _bad("tool_choice", f"tool_choice must be one of {', '.join(_MODES)} or a named function, got "
                                      f"{tool_choice!r}")  # fmt: skip
        if tool_choice != "none" and not functions:
            raise _bad("tools", f"tool_choice {tool_choice!r} needs tools: the request offers none")
        return ToolChoice(tool_choice)
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str) or tool_choice.get("type") != "function":
        raise _bad("tool_choice", 'tool_choice must be a string or {"type": "function", "function": {"name": ...}}')
    if name not in {f.name for f in functions}:
        offered = ", ".join(f.name for f in functions) or "none"
        raise _bad("tool_choice", f"tool_choice names the function {name!r}, which tools does not offer "
                                  f"(offered: {offered})")  # fmt: skip
    return ToolChoice("function", name)


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def functions_of(tools) -> list[FunctionSpec]:
    """The request's tool definitions (protocol.ToolDefinition) as FunctionSpecs; names unique."""
    functions, seen = [], set()
    for i, tool in enumerate(tools or ()):
        f = tool.function
        if f.name in seen:
            raise _bad(f"tools.{i}.function.name", f"tools.{i}.function.name: {f.name!r} is offered twice")
        seen.add(f.name)
        functions.append(FunctionSpec(f.name, f.description, f.parameters or {"type": "object", "properties": {}}))
    return functions


class ToolPlan:
    """One chat request's tools, for one model: its template, its parser."""

    def __init__(
        self, functions: list[FunctionSpec], choice: ToolChoice, parser: ToolParser, template: str | None,
        is_parallel: bool = True,
    ):  # fmt: skip
        self.functions = functions
        self.choice = choice
        self.parser = parser
        self.is_parallel = is_parallel  # false: the grammar admits one call
        source = template or ""
        self.template_reads_tools = re.search(r"\btools\b", source) is not None
        self.template_reads_calls = "tool_calls" in source
        self.template_knows_tool_role = re.search(r"""["']tool["']""", source) is not None

    @classmethod
    def build(cls, tools, tool_choice, is_parallel: bool, parser_name: str, template: str | None) -> ToolPlan:
        functions = functions_of(tools)
        return cls(functions, read_tool_choice(tool_choice, functions), parser_for(parser_name, template), template,
                   is_parallel)  # fmt: skip

    @property
    def is_reading_calls(self) -> bool:
        """Whether the output is read for calls (not with tool_choice none)."""
        return self.choice.mode != "none"

    def structured(self) -> StructuredOutput | None:
        """The grammar of `required` and named choices; None for the others."""
        if self.choice.mode == "required":
            return StructuredOutput("grammar", self.parser.grammar(self.functions, not self.is_parallel), "tools")
        if self.choice.mode == "function":
            named = [f for f in self.functions if f.name == self.choice.name]
            return StructuredOutput("grammar", self.parser.grammar(named, is_single=True), "tools")
        return None

    def read(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """A finished output's content and calls (no calls where the output is not read for them)."""
        if not self.is_reading_calls:
            return text, []
        content, calls = self.parser.extract(text)
        return content, calls if self.is_parallel else calls[:1]

    def render(self, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The conversation as the template should see it, and the template variables to add."""
        messages = [self._message(i, m) for i, m in enumerate(messages)]
        if self.choice.mode == "none" or not self.functions:
            return messages, {}
        if self.template_reads_tools:
            return messages, {"tools": [f.as_openai() for f in self.functions]}
        prompt = self.parser.tools_prompt(self.functions)
        if messages and messages[0].get("role") == "system":
            first = messages[0]
            text = first.get("content") or ""
            return [{**first, "content": f"{text}\n\n{prompt}" if text else prompt}, *messages[1:]], {}
        return [{"role": "system", "content": prompt}, *messages], {}

    def _message(self, index: int, message: dict[str, Any]) -> dict[str, Any]:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            calls = _calls_of(index, message["tool_calls"])
            if not self.template_reads_calls:
                text = message.get("content") or ""
                written = self.parser.format_calls(calls)
                rest = {k: v for k, v in message.items() if k != "tool_calls"}
                return {**rest, "content": f"{text}\n{written}" if text else written}
            # as vLLM: templates read the arguments as a mapping (`arguments | tojson`), not as text
            as_dicts = [{**tc, "function": {**tc["function"], "arguments": json.loads(c.arguments)}}
                        for tc, c in zip(message["tool_calls"], calls, strict=True)]  # fmt: skip
            return {**message, "content": message.get("content") or "", "tool_calls": as_dicts}
        if role == "tool" and not self.template_knows_tool_role:
            return {"role": "user", "content": self.parser.format_result(message.get("content") or "")}
        return message


def _calls_of(index: int, tool_calls: Any) -> list[ParsedCall]:
    """An assistant message's `tool_calls`, checked (400 naming the field where malformed)."""
    where = f"messages.{index}.tool_calls"
    if not isinstance(tool_calls, list):
        raise _bad(where, f"{where} must be a list")
    calls = []
    for k, tc in enumerate(tool_calls):
        function = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _bad(
                f"{where}.{k}", f"{where}.{k} must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}"
            )
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        try:
            json.loads(arguments)
        except json.JSONDecodeError:
            raise _bad(f"{where}.{k}.function.arguments", f"{where}.{k}.function.arguments is not valid JSON") from None
        calls.append(ParsedCall(function["name"], arguments))
    return calls
