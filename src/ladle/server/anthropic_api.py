"""Anthropic's Messages API: `POST /v1/messages` and `/v1/messages/count_tokens`, so that clients
of that API can point at Ladle.

A request is translated into a chat completion request (system prompt, messages, text blocks,
`tool_use` / `tool_result` blocks as tool calls and results, tools and tool_choice) and runs
through the same machinery as /v1/chat/completions (openai_api.start_chat: routing, templates,
admission, tool plans); only the response is written in Anthropic's shape, and errors in its
format (app.py picks the format by route). Models answering through an OpenAI upstream are refused
with a 503 here: their body cannot be forwarded as it came.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ladle.server.accounting import Meter, check_allowed, metered
from ladle.server.errors import APIError, from_validation_error
from ladle.server.openai_api import (
    SSE_HEADERS,
    ChatRun,
    Choice,
    chat_prompt,
    collect,
    parse_body,
    start_chat,
    tool_plan,
)
from ladle.server.protocol import ChatCompletionRequest
from ladle.server.tool_parsers import StreamingToolExtractor, new_call_id

# -- the wire format --------------------------------------------------------------------------------


class ContentBlock(BaseModel):
    model_config = ConfigDict(extra="allow")  # cache_control, citations, ...
    type: str
    text: str | None = None  # text
    id: str | None = None  # tool_use
    name: str | None = None  # tool_use
    input: dict[str, Any] | None = None  # tool_use
    tool_use_id: str | None = None  # tool_result
    content: str | list[ContentBlock] | None = None  # tool_result
    is_error: bool | None = None  # tool_result


class Message(BaseModel):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")  # cache_control, type
    name: str
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(BaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None  # type "tool"
    disable_parallel_tool_use: bool = False


class CountTokensRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # metadata, thinking, ...
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[ContentBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False


# -- translation into a chat completion request ------------------------------------------------------

_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
_FIELD_NAMES = {"stop": "stop_sequences"}  # chat request fields this API names otherwise


def _text(blocks: str | list[ContentBlock] | None, where: str) -> str:
    if blocks is None or isinstance(blocks, str):
        return blocks or ""
    parts = []
    for j, block in enumerate(blocks):
        if block.type != "text":
            raise APIError(400, f"{where}.{j}.type: content blocks of type {block.type!r} are not supported here "
                                "(this model reads text)", param=f"{where}.{j}.type")  # fmt: skip
        parts.append(block.text or "")
    return "".join(parts)


def _chat_messages(body: CountTokensRequest) -> list[dict[str, Any]]:
    messages = [{"role": "system", "content": _text(body.system, "system")}] if body.system else []
    for i, message in enumerate(body.messages):
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
            continue
        texts, calls = [], []
        for j, block in enumerate(message.content):
            where = f"messages.{i}.content.{j}"
            if block.type == "text":
                texts.append(block.text or "")
            elif block.type == "tool_use" and message.role == "assistant":
                arguments = json.dumps(block.input or {}, ensure_ascii=False)
                calls.append(
                    {"id": block.id, "type": "function", "function": {"name": block.name, "arguments": arguments}}
                )
            elif block.type == "tool_result" and message.role == "user":
                result = _text(block.content, f"{where}.content")
                messages.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": result})
            else:
                raise APIError(400, f"{where}.type: a {message.role} message cannot hold a {block.type!r} block "
                                    "here", param=f"{where}.type")  # fmt: skip
        if texts or calls:
            turn: dict[str, Any] = {"role": message.role, "content": "".join(texts)}
            if calls:
                turn["tool_calls"] = calls
            messages.append(turn)
    return messages


def _chat_request(body: CountTokensRequest, **sampling: Any) -> ChatCompletionRequest:
    fields: dict[str, Any] = {"model": body.model, "messages": _chat_messages(body), **sampling}
    if body.tools:
        fields["tools"] = [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description, "parameters": t.input_schema},
            }
            for t in body.tools
        ]
    choice = body.tool_choice
    if choice is not None:
        named = {"type": "function", "function": {"name": choice.name}}
        fields["tool_choice"] = named if choice.type == "tool" else _CHOICES[choice.type]
        fields["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as e:
        raise from_validation_error(e) from None


# -- routes -------------------------------------------------------------------------------------------


@metered("/v1/messages")
async def messages(request: Request, meter: Meter) -> Response:
    body: MessagesRequest = await parse_body(request, MessagesRequest)
    chat = _chat_request(
        body, max_tokens=body.max_tokens, stop=body.stop_sequences, temperature=body.temperature,
        top_p=body.top_p, top_k=body.top_k,
    )  # fmt: skip
    try:
        run = await start_chat(request, chat, None, meter)
    except APIError as e:  # a chat field's error, in this API's name for the field
        if e.param in _FIELD_NAMES:
            e.message, e.param = e.message.replace(e.param, _FIELD_NAMES[e.param], 1), _FIELD_NAMES[e.param]
        raise
    rid = f"msg_{request.state.request_id}"
    if body.stream:
        await run.gen.start(request)
        return StreamingResponse(
            _stream(run, rid), media_type="text/event-stream", headers={**SSE_HEADERS, **run.gen.headers}
        )
    choice = (await collect(request, run.gen, 1))[0]
    content, calls = run.tools.read(choice.text)
    blocks: list[dict[str, Any]] = [{"type": "text", "text": content}] if content else []
    for call in calls:
        blocks.append({"type": "tool_use", "id": _tool_use_id(new_call_id()), "name": call.name,
                       "input": _input(call.arguments)})  # fmt: skip
    reason, sequence = _stop_reason(choice, bool(calls))
    return JSONResponse(
        {
            "id": rid, "type": "message", "role": "assistant", "model": run.gen.model, "content": blocks,
            "stop_reason": reason, "stop_sequence": sequence, "usage": _usage(run),
        },
        headers=run.gen.headers,
    )  # fmt: skip


async def count_tokens(request: Request) -> Response:
    body: CountTokensRequest = await parse_body(request, CountTokensRequest)
    chat = _chat_request(body)
    state = request.app.state.ladle
    check_allowed(state, state.principal(request), chat.model)
    endpoint = (await state.resolve(chat.model)).endpoint
    if not hasattr(endpoint, "tokenizer"):
        raise APIError(503, f"the model `{endpoint.name}` is answering through an upstream: its tokens cannot be "
                            "counted here", code="upstream_only")  # fmt: skip
    plan = tool_plan(endpoint, chat.tools, chat.tool_choice, chat.parallel_tool_calls)
    return JSONResponse({"input_tokens": len(chat_prompt(endpoint, chat.messages, plan, True, None))})


# -- the response's parts ---------------------------------------------------------------------------------


def _tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _input(arguments: str) -> dict[str, Any]:
    """A call's arguments as the tool_use block's input (an output cut by max_tokens may leave
    them unfinished: then what could be read is lost, and stop_reason says max_tokens)."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _stop_reason(choice: Choice, has_calls: bool) -> tuple[str, str | None]:
    if choice.finish_reason == "length":
        return "max_tokens", None
    if has_calls:
        return "tool_use", None
    if isinstance(choice.stop_reason, str):
        return "stop_sequence", choice.stop_reason
    return "end_turn", None


def _usage(run: ChatRun) -> dict[str, int]:
    """Anthropic counts prompt tokens read from the cache apart from the input tokens."""
    u = run.gen.usage
    return {"input_tokens": u.prompt_tokens - u.cached_tokens, "output_tokens": u.completion_tokens,
            "cache_read_input_tokens": u.cached_tokens, "cache_creation_input_tokens": 0}  # fmt: skip


def _event(payload: dict[str, Any]) -> str:
    return f"event: {payload['type']}\ndata: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


class _Blocks:
    """The stream's content blocks: a text block open while text comes, one per tool call."""

    def __init__(self):
        self.num_blocks = 0
        self.open: tuple[str, int] | None = None  # ("text", -1) or ("tool", call index)

    def to(self, kind: str, call: int, start: dict[str, Any]) -> list[str]:
        if self.open == (kind, call):
            return []
        events = self.close()
        self.open = (kind, call)
        return [*events, _event({"type": "content_block_start", "index": self.num_blocks, "content_block": start})]

    def delta(self, delta: dict[str, Any]) -> str:
        return _event({"type": "content_block_delta", "index": self.num_blocks, "delta": delta})

    def close(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        self.num_blocks += 1
        return [_event({"type": "content_block_stop", "index": self.num_blocks - 1})]


async def _stream(run: ChatRun, rid: str):
    gen = run.gen
    extractor = StreamingToolExtractor(run.tools.parser) if run.tools.is_reading_calls else None
    message = {"id": rid, "type": "message", "role": "assistant", "model": gen.model, "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": {**_usage(run), "output_tokens": 0}}  # fmt: skip
    yield _event({"type": "message_start", "message": message})
    yield _event({"type": "ping"})
    blocks, choice = _Blocks(), Choice(0)
    try:
        async for _, out in gen.deltas():
            text, calls = out.new_text, []
            if extractor is not None:
                text, calls = extractor.feed(out.new_text, is_final=out.finished)
                calls = [d for d in calls if run.tools.is_parallel or d.index == 0]
            if text:
                for e in blocks.to("text", -1, {"type": "text", "text": ""}):
                    yield e
                yield blocks.delta({"type": "text_delta", "text": text})
            for d in calls:
                start = {"type": "tool_use", "id": _tool_use_id(d.id or ""), "name": d.name, "input": {}}
                for e in blocks.to("tool", d.index, start):
                    yield e
                if d.arguments:
                    yield blocks.delta({"type": "input_json_delta", "partial_json": d.arguments})
            if out.finished:
                choice.finish_reason, choice.stop_reason = out.finish_reason, out.stop_reason
    except APIError as e:  # after the 200: the error travels as an event
        gen.meter.failed(e)
        yield _event(e.anthropic_body())
        return
    finally:
        gen.finish()
    for e in blocks.close():
        yield e
    reason, sequence = _stop_reason(choice, extractor is not None and extractor.num_calls > 0)
    yield _event({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                  "usage": {"output_tokens": gen.usage.completion_tokens}})  # fmt: skip
    yield _event({"type": "message_stop"})
