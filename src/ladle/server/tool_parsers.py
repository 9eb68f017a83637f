"""Tool-call parsers: how one model family writes function calls in its output, read back into
OpenAI's `tool_calls`, and the grammar that makes the model write exactly such calls.

A parser reads the whole output so far (`scan`) and says which part of it is content to show and
which calls it holds, each with its name and the raw text of its arguments as the model wrote
them. A scan of a longer text only ever extends that of a shorter one (text that may still turn
into a call marker is held back until it is decided), so streaming diffs successive scans
(`StreamingToolExtractor`) and gets exactly the calls of the non-streaming `extract`, however the
text is split. What inside a call block cannot be read as a call comes out as content at the end.

Families plug in through `TOOL_PARSERS` (name -> class); `parser_for` picks one by name or from
the chat template's text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

# JSON written as json.dumps writes it: with free whitespace, a small model can pad forever
GRAMMAR_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass
class ParsedCall:
    name: str  # the function's name
    arguments: str  # the arguments' JSON text as the model wrote it (a prefix of it while streaming)


@dataclass
class Scan:
    content: str  # text outside the calls, safe to show now
    calls: list[ParsedCall] = field(default_factory=list)


@dataclass(frozen=True)
class FunctionSpec:
    """A tool the request offers: an OpenAI `{"type": "function", "function": {...}}`."""

    name: str
    description: str | None
    parameters: dict[str, Any]  # a JSON schema of the arguments object

    def as_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


# -- reading a `{"name": ..., "arguments": ...}` object from its first characters ------------------

_PARTIAL, _FAIL = -1, -2


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t\r\n":
        i += 1
    return i


def _expect(s: str, i: int, *literals: str) -> int:
    """The index after one of `literals` at s[i:] (whitespace first skipped); _PARTIAL where s ends
    inside one, _FAIL where none can follow."""
    i = _skip_ws(s, i)
    rest = s[i:]
    for lit in literals:
        if rest.startswith(lit):
            return i + len(lit)
    if any(lit.startswith(rest) for lit in literals):
        return _PARTIAL
    return _FAIL


def _string_end(s: str, i: int) -> int:
    """s[i] is a quote: the index after the closing quote, or _PARTIAL."""
    j = i + 1
    while j < len(s):
        if s[j] == "\\":
            j += 2
            continue
        if s[j] == '"':
            return j + 1
        j += 1
    return _PARTIAL


def _value_end(s: str, i: int) -> int:
    """The index after the JSON value that starts at s[i], or _PARTIAL where s ends inside it."""
    c = s[i]
    if c == '"':
        return _string_end(s, i)
    if c not in "{[":
        j = i
        while j < len(s) and s[j] not in ",}] \t\r\n":
            j += 1
        return j if j < len(s) else _PARTIAL
    depth, j = 0, i
    while j < len(s):
        c = s[j]
        if c == '"':
            j = _string_end(s, j)
            if j == _PARTIAL:
                return _PARTIAL
            continue
        if c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return _PARTIAL


@dataclass
class _Object:
    status: str  # "done", "partial" (may still become a call) or "fail" (not a call)
    name: str | None = None  # once read
    arguments: str = ""  # the arguments' text so far
    end: int = 0  # where the object ends (status "done")


def _scan_object(s: str, i: int, argument_keys: tuple[str, ...]) -> _Object:
    """A call object `{"name": "f", "arguments": {...}}` starting at s[i] (after whitespace)."""
    first = _skip_ws(s, i)
    for lit in ("{", '"name"', ":"):
        i = _expect(s, i, lit)
        if i < 0:
            return _Object("partial" if i == _PARTIAL else "fail")
    i = _skip_ws(s, i)
    if i == len(s):
        return _Object("partial")
    end = _string_end(s, i) if s[i] == '"' else _FAIL
    if end == _FAIL:
        return _Object("fail")
    if end == _PARTIAL:
        return _Object("partial")
    try:
        name = json.loads(s[i:end])
    except json.JSONDecodeError:
        return _Object("fail")
    for lits in ((",",), tuple(f'"{k}"' for k in argument_keys), (":",)):
        end = _expect(s, end, *lits)
        if end < 0:
            return _Object("partial" if end == _PARTIAL else "fail")
    return _scan_arguments(s, first, _skip_ws(s, end), name)


def _scan_arguments(s: str, first: int, start: int, name: str) -> _Object:
    """The rest of a call object whose arguments value starts at s[start]."""
    if start == len(s):
        return _Object("partial", name)
    stop = _value_end(s, start)
    if stop == _PARTIAL:
        return _Object("partial", name, s[start:])
    close = _expect(s, stop, "}")
    if close == _PARTIAL:
        return _Object("partial", name, s[start:stop])
    if close == _FAIL:  # more keys than name and arguments: the object ends where JSON says
        try:
            _, close = json.JSONDecoder().raw_decode(s, first)
        except json.JSONDecodeError:
            return _Object("partial", name, s[start:stop])
    return _Object("done", name, s[start:stop], close)


def _held_suffix(text: str, marker: str) -> int:
    """The length of the longest end of text that is a start of marker (text that may be one)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def _lark_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


# -- the parsers ------------------------------------------------------------------------------------


class ToolParser:
    """One family's call format. Subclasses set the markers and implement `scan`."""

    name: ClassVar[str]
    argument_key: ClassVar[str]  # the key the family writes the arguments under
    call_open: ClassVar[str] = ""  # what the grammar writes before each call object
    call_close: ClassVar[str] = ""  # ... and after it
    call_separator: ClassVar[str] = ""  # ... and between two calls

    def scan(self, text: str, is_final: bool) -> Scan:
        raise NotImplementedError

    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """The content (None where only calls were written) and the calls of a finished output."""
        result = self.scan(text, is_final=True)
        content = result.content if result.content.strip() or not result.calls else None
        return content, result.calls

    def call_text(self, name: str, arguments: str) -> str:
        return f'{{"name": {json.dumps(name, ensure_ascii=False)}, "{self.argument_key}": {arguments}}}'

    def format_calls(self, calls: list[ParsedCall]) -> str:
        """Calls as the model writes them (an assistant turn, for templates that cannot render
        `tool_calls` themselves)."""
        written = [self.call_open + self.call_text(c.name, c.arguments) + self.call_close for c in calls]
        return self.call_separator.join(written)

    def format_result(self, content: str) -> str:
        """A tool's result, as a user turn (for templates that know no `tool` role)."""
        return content

    def tools_prompt(self, functions: list[FunctionSpec]) -> str:
        """The tools described in a system prompt, for templates that ignore `tools`."""
        raise NotImplementedError

    def grammar(self, functions: list[FunctionSpec], is_single: bool) -> str:
        """A Lark grammar (llguidance's dialect): one call of any of `functions` (is_single) or one
        or more, each call's arguments matching its function's parameters schema."""
        lines = ["start: call" if is_single else f"start: call ({_lark_literal(self.call_separator)} call)*"]
        parts = [_lark_literal(self.call_open), "body", _lark_literal(self.call_close)]
        lines.append("call: " + " ".join(p for p in parts if p != '""'))
        lines.append("body: " + " | ".join(f"f{i}" for i in range(len(functions))))
        for i, f in enumerate(functions):
            head = f'{{"name": {json.dumps(f.name, ensure_ascii=False)}, "{self.argument_key}": '
            lines.append(f'f{i}: {_lark_literal(head)} a{i} "}}"')
            schema = {**f.parameters, "x-guidance": GRAMMAR_JSON_OPTIONS}
            lines.append(f"a{i}: %json {json.dumps(schema, ensure_ascii=False)}")
        return "\n".join(lines) + "\n"


class HermesToolParser(ToolParser):
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call (Hermes,
    Qwen2.5, Qwen3). Content is the text before the first block (less the whitespace before it);
    text between or after blocks, and blocks that hold no call, come out as content once the output
    ends."""

    name = "hermes"
    argument_key = "arguments"
    call_open = "<tool_call>\n"
    call_close = "\n</tool_call>"
    call_separator = "\n"
    START, END = "<tool_call>", "</tool_call>"

    def scan(self, text: str, is_final: bool) -> Scan:
        first = text.find(self.START)
        if first < 0:
            # while it may go on, trailing whitespace waits too: it goes where a call follows
            return Scan(text if is_final else text[: len(text) - _held_suffix(text, self.START)].rstrip())
        calls, late = [], []  # late: content known only once the output ends
        pos = first
        while pos >= 0:
            body_start = pos + len(self.START)
            close = text.find(self.END, body_start)
            body = text[body_start : close if close >= 0 else len(text)]
            obj = _scan_object(body, 0, ("arguments", "parameters"))
            if obj.name is not None:
                calls.append(ParsedCall(obj.name, obj.arguments))
            else:
                late.append(text[pos : close + len(self.END) if close >= 0 else len(text)])
            if close < 0:
                break
            after = close + len(self.END)
            pos = text.find(self.START, after)
            late.append(text[after : pos if pos >= 0 else len(text)])
        content = text[:first].rstrip() + ("".join(late) if is_final and "".join(late).strip() else "")
        return Scan(content, calls)

    def format_result(self, content: str) -> str:
        return f"<tool_response>\n{content}\n</tool_response>"

    def tools_prompt(self, functions: list[FunctionSpec]) -> str:
        listed = "\n".join(json.dumps(f.as_openai(), ensure_ascii=False) for f in functions)
        return (
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n"
            "</tools>\n\nFor each function call, return a json object with function name and arguments within "
            '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
            "<args-json-object>}\n</tool_call>"
        )


class Llama3JsonToolParser(ToolParser):
    """Llama 3.x's JSON calls: the output is `{"name": ..., "parameters": {...}}` (after an optional
    `<|python_tag|>`), several separated by `; `. An output that does not start so is content."""

    name = "llama3_json"
    argument_key = "parameters"
    call_separator = "; "
    PYTHON_TAG = "<|python_tag|>"

    def scan(self, text: str, is_final: bool) -> Scan:
        i = _skip_ws(text, 0)
        if text.startswith(self.PYTHON_TAG, i):
            i = _skip_ws(text, i + len(self.PYTHON_TAG))
        elif not is_final and self.PYTHON_TAG.startswith(text[i:]):
            return Scan("")  # nothing yet, or the start of the tag
        if i == len(text):
            return Scan(text if is_final else "")
        if text[i] != "{":
            return Scan(text)
        calls: list[ParsedCall] = []
        while True:
            obj = _scan_object(text, i, ("parameters", "arguments"))
            if obj.name is None:
                if not calls and (is_final or obj.status == "fail"):
                    return Scan(text)  # not a call: a JSON answer, say
                rest = text[i:]
                break
            calls.append(ParsedCall(obj.name, obj.arguments))
            if obj.status != "done":
                return Scan("", calls)
            after = _expect(text, obj.end, ";")
            if after >= 0:
                i = _skip_ws(text, after)
                continue
            rest = text[obj.end :] if after == _FAIL else ""
            break
        return Scan(rest if is_final and rest.strip() else "", calls)

    def tools_prompt(self, functions: list[FunctionSpec]) -> str:
        listed = "\n\n".join(json.dumps(f.as_openai(), ensure_ascii=False, indent=4) for f in functions)
        return (
            "Given the following functions, please respond with a JSON for a function call with its proper "
            "arguments that best answers the given prompt.\n\nRespond in the format "
            '{"name": function name, "parameters": dictionary of argument name and its value}. '
            f"Do not use variables.\n\n{listed}"
        )


TOOL_PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesToolParser, Llama3JsonToolParser)}
DEFAULT_PARSER = "hermes"  # for templates that show no format of their own: Ladle writes the tools prompt


def parser_for(name: str, template_source: str | None) -> ToolParser:
    """The parser named (`auto`: the one the chat template's text shows, else hermes)."""
    if name != "auto":
        return TOOL_PARSERS[name]()
    source = template_source or ""
    if "<tool_call>" in source:
        return HermesToolParser()
    if "<|python_tag|>" in source or ('"parameters"' in source and "ipython" in source):
        return Llama3JsonToolParser()
    return TOOL_PARSERS[DEFAULT_PARSER]()


# -- streaming ----------------------------------------------------------------------------------------


@dataclass
class ToolCallDelta:
    index: int  # the call's position in the output
    id: str | None = None  # on the call's first delta
    name: str | None = None  # on the call's first delta
    arguments: str = ""  # the next fragment of the arguments' JSON text


class StreamingToolExtractor:
    """Fed the output's text deltas, says what is new: content, then calls (id and name first, then
    argument fragments). The scans extend each other, so the deltas add up to `extract`."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.text = ""
        self.num_content_sent = 0
        self.num_arguments_sent: list[int] = []
        self.ids: list[str] = []

    def feed(self, delta: str, is_final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        self.text += delta
        scan = self.parser.scan(self.text, is_final)
        content = scan.content[self.num_content_sent :]
        self.num_content_sent = max(self.num_content_sent, len(scan.content))
        deltas = []
        for index, call in enumerate(scan.calls):
            if index == len(self.ids):
                self.ids.append(new_call_id())
                self.num_arguments_sent.append(0)
                deltas.append(ToolCallDelta(index, self.ids[index], call.name))
            fragment = call.arguments[self.num_arguments_sent[index] :]
            if fragment:
                self.num_arguments_sent[index] = len(call.arguments)
                if deltas and deltas[-1].index == index:
                    deltas[-1].arguments = fragment
                else:
                    deltas.append(ToolCallDelta(index, arguments=fragment))
        return content, deltas

    @property
    def num_calls(self) -> int:
        return len(self.ids)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
