"""OpenAI-compatible endpoints: completions, chat completions, models, tokenize, detokenize.

Handlers stay thin: validate, turn the request into engine jobs, stream or collect the deltas,
format. A client that goes away (streaming or not) cancels its jobs, which aborts them in the
engine and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ladle.engine.outputs import RequestOutput
from ladle.engine.request import GenerateRequest
from ladle.errors import InvalidRequestError, LadleError
from ladle.metering.tenants import DEFAULT_TENANT, prefix_cache_salt
from ladle.router.complexity import Features
from ladle.router.router import Route
from ladle.router.upstream import Upstream, UpstreamError
from ladle.sample.params import SamplingParams
from ladle.server.accounting import Meter, Usage, check_allowed, metered
from ladle.server.errors import (
    APIError,
    ClientDisconnected,
    from_ladle_error,
    from_validation_error,
    read_json_object,
)
from ladle.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from ladle.server.state import ServerState
from ladle.server.tool_parsers import StreamingToolExtractor, ToolCallDelta, new_call_id
from ladle.server.tools import ToolPlan

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _state(request: Request) -> ServerState:
    return request.app.state.ladle


async def parse_body(request: Request, model: type[BaseModel]):
    data = await read_json_object(request)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None


# -- jobs: one engine request per prompt ------------------------------------------------------------


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: list | None = None  # completions with prompt logprobs: per prompt token (None first)


class Generation:
    """The engine jobs of one HTTP request, merged into one stream of (choice index, delta)."""

    def __init__(
        self,
        state: ServerState,
        route: Route,
        jobs: list[GenerateRequest],
        n: int,
        queue_timeout_s: float | None,
        meter: Meter,
    ):
        self.state = state
        self.route = route
        self.meter = meter
        self.queue_timeout_s = queue_timeout_s
        self.model = route.name  # the model that answers, for metrics and the response
        # admitted against a TTFT target: not started by then, a job is dropped (429), not served late
        self.start_by_s = time.monotonic() + route.start_within_s if route.start_within_s is not None else None
        if self.start_by_s is not None:
            jobs = [replace(j, deadline_s=min(self.start_by_s, j.deadline_s or self.start_by_s)) for j in jobs]
        self.jobs = jobs
        self.n = n
        self.usage = Usage(prompt_tokens=sum(len(j.prompt_token_ids) for j in jobs))
        meter.routed(route)
        meter.usage = self.usage  # the row counts what the response tells
        self._cached: dict[int, int] = {}
        # made right after admission, before any await: the next request's admission sees these
        # jobs, though they reach the engine only once the response starts
        for job in jobs:
            route.endpoint.reserve(job)
        self._first: tuple[int, RequestOutput] | None = None  # what start() waited for
        self._rest: AsyncIterator[tuple[int, RequestOutput]] | None = None

    async def start(self, request: Request) -> None:
        """Wait for the first output before a stream's headers go, so that what ends a request
        before any token (a queue timeout, a drop at its start-by) is still an HTTP status; a
        client that leaves meanwhile aborts the jobs (ClientDisconnected)."""
        self._rest = self._merged()
        first = asyncio.ensure_future(anext(self._rest))
        watcher = asyncio.create_task(_until_disconnected(request))
        try:
            await asyncio.wait({first, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not first.done():
                first.cancel()  # cancelling the jobs aborts them in the engine
                await asyncio.wait({first})
        try:
            if first.cancelled():
                raise ClientDisconnected
            self._first = first.result()
        except StopAsyncIteration:
            pass
        except BaseException:
            self.finish()
            raise

    async def deltas(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every job's deltas, merged (after start(): the first one it waited for, then the rest)."""
        if self._rest is None:
            self._rest = self._merged()
        elif self._first is not None:
            yield self._delivered(*self._first)
        async for item in self._rest:
            yield self._delivered(*item)

    def _delivered(self, index: int, out: RequestOutput) -> tuple[int, RequestOutput]:
        """A delta handed to the response: its tokens count in the usage (a client that leaves
        is charged what it was handed), its timings in the meter."""
        self.usage.completion_tokens += len(out.new_token_ids)
        self.meter.observe(index, out)
        return index, out

    async def _merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        if len(self.jobs) == 1:
            async for out in self._job(0):
                yield out
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int):
            try:
                async for item in self._job(i):
                    await queue.put(item)
            except BaseException as e:  # an engine error reaches the response
                await queue.put(e)
            finally:
                await queue.put(done)

        tasks = [asyncio.create_task(pump(i)) for i in range(len(self.jobs))]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()

    async def _job(self, i: int):
        job = self.jobs[i]
        endpoint = self.route.endpoint
        metrics = self.state.metrics
        last = time.monotonic()
        num_finished = 0
        try:
            async for out in endpoint.generate(job):
                if out.finish_reason == "timeout":
                    metrics.observe_outcome(self.model, "timed_out")
                    if job.deadline_s == self.start_by_s:  # its target's start-by came first
                        raise self._late(job)
                    raise QueueTimeout(self.queue_timeout_s)
                now = time.monotonic()
                if out.new_token_ids and out.num_output_tokens > len(out.new_token_ids):
                    metrics.itl.labels(self.model).observe(now - last)
                last = now
                if out.index == 0:
                    self._cached[i] = out.num_cached_tokens
                    self.usage.cached_tokens = sum(self._cached.values())
                if out.finished:
                    num_finished += 1
                    metrics.observe_sample(self.model, out.metrics, out.num_output_tokens, out.finish_reason)
                yield i * self.n + out.index, out
        finally:
            for _ in range(job.params.n - num_finished):  # the client left: its samples were aborted
                metrics.observe_sample(self.model, None, 0, "abort")

    def _late(self, job: GenerateRequest) -> APIError:
        endpoint = self.route.endpoint
        retry = self.state.router.retry_after(endpoint, len(job.prompt_token_ids))
        return APIError(
            429,
            f"the model `{endpoint.name}` could not start the request in time for its TTFT target of "
            f"{endpoint.entry.targets.ttft_ms:g} ms (the queue ahead took longer than predicted); retry after "
            "the delay given in Retry-After",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry)},
        )

    def finish(self) -> None:
        u = self.usage
        self.state.metrics.observe_usage(self.model, u.prompt_tokens, u.cached_tokens, u.completion_tokens)

    @property
    def headers(self) -> dict[str, str]:
        """What answered and why (the response's `model` says the same)."""
        return {"X-Ladle-Routed-To": self.route.name, "X-Ladle-Route-Reason": self.route.reason}


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(request: Request, gen: Generation, num_choices: int) -> list[Choice]:
    """Run to the end, or until the client disconnects (then the jobs are aborted)."""
    choices = [Choice(i) for i in range(num_choices)]

    async def run():
        async for index, out in gen.deltas():
            _apply(choices[index], out)

    task = asyncio.create_task(run())
    watcher = asyncio.create_task(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gen.finish()
        if not task.done():
            task.cancel()  # the client left: cancelling the jobs aborts them in the engine
        watcher.cancel()
    if task.cancelled() or not task.done():
        raise ClientDisconnected
    task.result()
    return choices


def _apply(choice: Choice, out: RequestOutput) -> None:
    choice.text += out.new_text
    choice.token_ids.extend(out.new_token_ids)
    if out.logprobs:
        choice.logprobs.extend(zip(out.new_token_ids, out.logprobs, strict=True))
    if out.prompt_logprobs is not None:
        choice.prompt_logprobs = out.prompt_logprobs
    if out.finished:
        choice.finish_reason, choice.stop_reason = out.finish_reason, out.stop_reason


class QueueTimeout(APIError):
    def __init__(self, waited_s: float | None):
        super().__init__(
            503,
            f"the request waited {waited_s:g} s in the queue without starting (its queue timeout): the server "
            "is overloaded; retry later",
            code="queue_timeout",
            headers={"Retry-After": "1"},
        )


def _queue_timeout_s(state: ServerState, body) -> float | None:
    return body.queue_timeout if body.queue_timeout is not None else state.config.admission.queue_timeout_s


def _tenancy(request: Request, state: ServerState, body) -> dict:
    """What the engine needs to know of who sent the request: its tenant and weight (fair
    scheduling), its priority (the tenant's class; the body's field for the default tenant, as
    before tenants) and its prefix-cache salt (per tenant unless the config shares the cache)."""
    tenant = state.principal(request).tenant
    is_default = tenant.id == DEFAULT_TENANT
    return {
        "tenant": tenant.id,
        "weight": tenant.weight,
        "priority": body.priority if is_default else tenant.priority,
        "cache_salt": prefix_cache_salt(tenant.id, body.cache_salt, state.config.metering.share_prefix_cache),
    }


def _jobs(
    endpoint, prompts: list[list[int]], params: SamplingParams, tenancy: dict, timeout_s: float | None
) -> list[GenerateRequest]:
    """One job per prompt; `tenancy` (_tenancy) gives tenant, weight, priority and cache_salt."""
    jobs = []
    deadline = time.monotonic() + timeout_s if timeout_s is not None else None
    for ids in prompts:
        job = GenerateRequest(f"{uuid.uuid4().hex}", ids, params, deadline_s=deadline, **tenancy)
        try:
            endpoint.validate(ids, params)
        except LadleError as e:
            raise from_ladle_error(e) from None
        jobs.append(job)
    return jobs


def _sampling(body, max_tokens, logprobs, prompt_logprobs=None) -> SamplingParams:
    try:
        return body.sampling_params(max_tokens, logprobs, prompt_logprobs)
    except LadleError as e:
        raise from_ladle_error(e) from None


async def _ready(endpoint, params: SamplingParams) -> None:
    """The endpoint prepares what the request needs (its output grammar) before admission. (A
    model the request degrades to compiles it as the request reaches its engine: no await may
    come between admission and the reservation.)"""
    try:
        await endpoint.prepare(params)
    except LadleError as e:
        raise from_ladle_error(e) from None


async def _prepare(request: Request, body, features: Features, meter: Meter):
    """The server state and the model the request's name reaches (an `auto` router scores it)."""
    state = _state(request)
    meter.requesting(body.model)
    problem = body.unsupported()
    if problem:
        param, message = problem
        raise APIError(400, message, param=param, code="unsupported")
    pick = await state.resolve(body.model, features)
    request.scope["state"]["model"] = pick.endpoint.name  # for the HTTP metrics
    return state, pick


def _reserve(request: Request, state: ServerState, endpoint, jobs: list[GenerateRequest]) -> None:
    """Count the request against its tenant's quota before admission (429 over a limit), with
    what it may use at most: each prompt, and n samples of max_tokens (or what the context leaves)."""
    tokens = 0
    for job in jobs:
        num_prompt = len(job.prompt_token_ids)
        left = max(0, endpoint.max_model_len - num_prompt)
        max_tokens = job.params.max_tokens
        tokens += num_prompt + job.params.n * (left if max_tokens is None else min(max_tokens, left))
    state.reserve_quota(state.principal(request), request.state.request_id, tokens)


def _reserve_upstream(request: Request, state: ServerState, text: str, max_tokens: int | None) -> None:
    """The same for a request an upstream answers as it came (its prompt untokenized here: 4
    characters a token, as the router estimates; the usage row settles it)."""
    state.reserve_quota(state.principal(request), request.state.request_id, len(text) // 4 + (max_tokens or 0))


def _admit(request: Request, state: ServerState, pick, jobs: list[GenerateRequest]) -> Route:
    route = state.admit(pick, sum(len(j.prompt_token_ids) for j in jobs))
    request.scope["state"]["model"] = route.name
    return route


async def _proxy(request: Request, state: ServerState, route: Route, path: str, meter: Meter) -> Response:
    """The request as it came, answered by an upstream: its body (or stream) unchanged, its usage
    counted under the upstream's name, and the route in the headers."""
    upstream = route.endpoint
    meter.routed(route)
    try:
        forwarded = await upstream.forward(path, json.loads(await request.body()), route.requested)
    except UpstreamError as e:
        raise APIError(502, str(e), code="upstream_error") from None
    headers = {**forwarded.headers, "X-Ladle-Routed-To": upstream.name, "X-Ladle-Route-Reason": route.reason}
    headers.pop("content-type", None)
    media_type = forwarded.headers.get("content-type", "application/json")

    def count() -> None:
        meter.usage = u = Usage.from_openai(forwarded.usage)  # what the upstream told the client
        state.metrics.observe_usage(upstream.name, u.prompt_tokens, u.cached_tokens, u.completion_tokens)

    if isinstance(forwarded.body, bytes):
        count()
        return Response(forwarded.body, status_code=forwarded.status, headers=headers, media_type=media_type)

    async def relay():
        try:
            async for chunk in forwarded.body:
                yield chunk
        finally:
            count()

    return StreamingResponse(relay(), headers={**SSE_HEADERS, **headers}, media_type="text/event-stream")


# -- /v1/completions ------------------------------------------------------------------------------


@metered("/v1/completions")
async def completions(request: Request, meter: Meter) -> Response:
    body: CompletionRequest = await parse_body(request, CompletionRequest)
    text = "\n".join(p for p in body.prompts() if isinstance(p, str))
    state, pick = await _prepare(request, body, Features(text, 1, body.max_tokens), meter)
    endpoint = pick.endpoint
    try:
        body.check_max_tokens()
    except LadleError as e:
        raise from_ladle_error(e) from None
    params = _sampling(body, body.max_tokens, body.logprobs, body.prompt_logprobs_count)
    timeout_s = _queue_timeout_s(state, body)
    tenancy = _tenancy(request, state, body)

    def prepared(ep):  # the prompts in this endpoint's tokens, and their jobs
        prompts = [ep.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in body.prompts()]
        return prompts, _jobs(ep, prompts, params, tenancy, timeout_s)

    if isinstance(endpoint, Upstream):  # the model is failing: its fallback answers
        _reserve_upstream(request, state, text, body.max_tokens)
        return await _proxy(request, state, _admit(request, state, pick, []), "completions", meter)
    await _ready(endpoint, params)
    prompts, jobs = prepared(endpoint)
    _reserve(request, state, endpoint, jobs)
    route = _admit(request, state, pick, jobs)
    if isinstance(route.endpoint, Upstream):
        return await _proxy(request, state, route, "completions", meter)
    if route.endpoint is not endpoint:  # degraded: another model, maybe another tokenizer
        prompts, jobs = prepared(route.endpoint)
    tok = route.endpoint.tokenizer
    rid = f"cmpl-{request.state.request_id}"
    created = int(time.time())
    gen = Generation(state, route, jobs, body.n, timeout_s, meter)
    echo = [tok.decode(ids, skip_special_tokens=False) if body.echo else "" for ids in prompts]
    num_choices = len(jobs) * body.n
    if body.stream:
        await gen.start(request)
        return StreamingResponse(
            _completion_stream(gen, rid, created, gen.model, echo, body, tok, prompts),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **gen.headers},
        )
    choices = await collect(request, gen, num_choices)
    return JSONResponse(
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": gen.model,
            "choices": [
                {
                    "index": c.index,
                    "text": echo[c.index // body.n] + c.text,
                    "logprobs": _choice_logprobs(
                        tok, body, prompts[c.index // body.n], c.prompt_logprobs, echo[c.index // body.n], c.logprobs
                    ),
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                    **_vllm_prompt_logprobs(tok, body, prompts[c.index // body.n], c.prompt_logprobs),
                }
                for c in choices
            ],
            "usage": gen.usage.as_dict(),
        },
        headers=gen.headers,
    )


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


def _choice_logprobs(tok, body, prompt_ids, prompt_logprobs, echo_text: str, items, text_offset: int = 0):
    """A choice's (or a stream chunk's) legacy logprobs: with echo, the prompt's entries (when they
    came with this output) and then the generated ones; None without logprobs."""
    if body.logprobs is None:
        return None
    generated = _completion_logprobs(tok, items, text_offset + len(echo_text))
    if not (body.echo and prompt_logprobs is not None):
        return generated
    prompt = _completion_logprobs(tok, list(zip(prompt_ids, prompt_logprobs, strict=True)), text_offset)
    return {key: prompt[key] + generated[key] for key in prompt}


def _vllm_prompt_logprobs(tok, body, prompt_ids, prompt_logprobs) -> dict:
    """vLLM's `prompt_logprobs` field of a choice, when the request set prompt_logprobs: per prompt
    token None (the first) or {token id: {logprob, decoded_token}} of the token and its alternatives."""
    if body.prompt_logprobs is None or prompt_logprobs is None:
        return {}
    entries = []
    for token_id, lp in zip(prompt_ids, prompt_logprobs, strict=True):
        if lp is None:
            entries.append(None)
            continue
        alternatives = {**dict(lp.top), token_id: lp.logprob}
        entries.append({str(t): {"logprob": v, "decoded_token": _token_text(tok, t)} for t, v in alternatives.items()})
    return {"prompt_logprobs": entries}


async def _completion_stream(gen: Generation, rid, created, model, echo, body, tok, prompts):
    offsets: dict[int, int] = {}
    started: set[int] = set()
    include_usage = body.include_usage
    try:
        async for index, out in gen.deltas():
            text = out.new_text
            prompt_text = ""
            if index not in started:
                started.add(index)
                prompt_text = echo[index // gen.n]
            if not text and not prompt_text and not out.finished and not out.new_token_ids:
                continue
            logprobs = None
            if out.logprobs or out.prompt_logprobs is not None:
                items = list(zip(out.new_token_ids, out.logprobs, strict=True)) if out.logprobs else []
                logprobs = _choice_logprobs(
                    tok, body, prompts[index // gen.n], out.prompt_logprobs, prompt_text, items, offsets.get(index, 0)
                )
            offsets[index] = offsets.get(index, 0) + len(prompt_text + text)
            choice = {
                "index": index,
                "text": prompt_text + text,
                "logprobs": logprobs,
                "finish_reason": out.finish_reason if out.finished else None,
                "stop_reason": out.stop_reason if out.finished else None,
                **_vllm_prompt_logprobs(tok, body, prompts[index // gen.n], out.prompt_logprobs),
            }
            chunk = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
            if include_usage:
                chunk["usage"] = None
            yield _sse(chunk)
    except APIError as e:  # after the 200: the error travels as an event, as vLLM sends it
        gen.meter.failed(e)
        yield _sse(e.body())
        yield "data: [DONE]\n\n"
        return
    finally:
        gen.finish()
    if include_usage:
        yield _sse(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [],
                "usage": gen.usage.as_dict(),
            }
        )
    yield "data: [DONE]\n\n"


def _token_text(tok, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def _top_by_text(tok, top: list[tuple[int, float]]) -> dict[str, float]:
    """The alternatives keyed by their text, as the legacy format has them; where two tokens share a
    text (pieces of one UTF-8 character), the better one's logprob stays."""
    by_text: dict[str, float] = {}
    for token_id, logprob in top:
        by_text.setdefault(_token_text(tok, token_id), logprob)
    return by_text


def _completion_logprobs(tok, items, text_offset: int) -> dict:
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token_id, lp in items:  # lp None: the prompt's first token (nothing to predict it from)
        text = _token_text(tok, token_id)
        tokens.append(text)
        token_logprobs.append(None if lp is None else lp.logprob)
        top.append(None if lp is None else _top_by_text(tok, lp.top))
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


# -- /v1/chat/completions -------------------------------------------------------------------------


def tool_plan(ep, tools, tool_choice, is_parallel: bool) -> ToolPlan:
    """A request's tools for one model: its template and its family's parser."""
    template = ep.tokenizer.chat_template.source if ep.tokenizer.chat_template else None
    return ToolPlan.build(tools, tool_choice, is_parallel, ep.entry.tool_call_parser, template)


def chat_prompt(ep, messages, plan: ToolPlan, add_generation_prompt: bool, kwargs: dict | None) -> list[int]:
    """The conversation (and its tools) in the model's chat template, as token ids."""
    try:
        rendered, variables = plan.render([m.as_template_dict() for m in messages])
        return ep.tokenizer.encode_chat(
            rendered, add_generation_prompt=add_generation_prompt, **{**(kwargs or {}), **variables}
        )
    except InvalidRequestError as e:
        raise from_ladle_error(e) from None


@dataclass
class ChatRun:
    """A chat request admitted: its jobs under way, and how their output reads."""

    gen: Generation
    tok: object  # the answering model's tokenizer
    tools: ToolPlan  # the request's tools for that model (none offered: reads no calls)


async def start_chat(
    request: Request, body: ChatCompletionRequest, proxy_path: str | None, meter: Meter
) -> ChatRun | Response:
    """Route, render, admit and start a chat request (shared by the OpenAI and Anthropic APIs).
    A model that answers through an upstream is proxied at proxy_path (None: refused)."""
    text = "\n".join(m.content if isinstance(m.content, str) else "" for m in body.messages)
    state, pick = await _prepare(request, body, Features(text, len(body.messages), body.output_limit), meter)
    endpoint = pick.endpoint
    params = _sampling(body, body.output_limit, body.logprobs_count)
    timeout_s = _queue_timeout_s(state, body)
    tenancy = _tenancy(request, state, body)

    def planned(ep):  # the request's tools for this endpoint, and its sampling with their grammar
        plan = tool_plan(ep, body.tools, body.tool_choice, body.parallel_tool_calls)
        grammar = plan.structured()
        if grammar is not None and params.structured is not None:
            raise APIError(400, f"tool_choice {body.tool_choice!r} constrains the output to tool calls: it cannot "
                           f"be combined with {params.structured.param}", param=params.structured.param)  # fmt: skip
        return plan, replace(params, structured=grammar or params.structured)

    def prepared(ep, plan, ep_params):  # the conversation in this endpoint's chat template and tokens, as one job
        prompt = chat_prompt(ep, body.messages, plan, body.add_generation_prompt, body.chat_template_kwargs)
        return _jobs(ep, [prompt], ep_params, tenancy, timeout_s)

    def upstream(route):
        if proxy_path is None:
            message = (f"the model `{route.name}` is answering through an OpenAI-compatible upstream, which this "
                       "API cannot reach: retry later, or use /v1/chat/completions")  # fmt: skip
            raise APIError(503, message, code="upstream_only")
        return _proxy(request, state, route, proxy_path, meter)

    if isinstance(endpoint, Upstream):
        _reserve_upstream(request, state, text, body.output_limit)
        return await upstream(_admit(request, state, pick, []))
    plan, ep_params = planned(endpoint)
    await _ready(endpoint, ep_params)
    jobs = prepared(endpoint, plan, ep_params)
    _reserve(request, state, endpoint, jobs)
    route = _admit(request, state, pick, jobs)
    if isinstance(route.endpoint, Upstream):
        return await upstream(route)
    if route.endpoint is not endpoint:
        plan, ep_params = planned(route.endpoint)
        jobs = prepared(route.endpoint, plan, ep_params)
    return ChatRun(Generation(state, route, jobs, body.n, timeout_s, meter), route.endpoint.tokenizer, plan)


@metered("/v1/chat/completions")
async def chat_completions(request: Request, meter: Meter) -> Response:
    body: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)
    run = await start_chat(request, body, "chat/completions", meter)
    if isinstance(run, Response):
        return run
    gen, tok = run.gen, run.tok
    rid = f"chatcmpl-{request.state.request_id}"
    created = int(time.time())
    if body.stream:
        await gen.start(request)
        return StreamingResponse(
            _chat_stream(run, rid, created, body.include_usage),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **gen.headers},
        )
    choices = [
        {
            "index": c.index,
            **_chat_message(run.tools, c),
            "logprobs": {"content": _chat_logprobs(tok, c.logprobs)} if body.logprobs else None,
            "stop_reason": c.stop_reason,
        }
        for c in await collect(request, gen, body.n)
    ]
    meter.finished_as(0, choices[0]["finish_reason"])
    return JSONResponse(
        {"id": rid, "object": "chat.completion", "created": created, "model": gen.model, "choices": choices,
         "usage": gen.usage.as_dict()},
        headers=gen.headers,
    )  # fmt: skip


def _chat_message(plan: ToolPlan, c: Choice) -> dict:
    """A finished choice's message (content, tool_calls) and finish_reason."""
    content, calls = plan.read(c.text)
    message: dict = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [
            {"id": new_call_id(), "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in calls
        ]
    return {"message": message, "finish_reason": _finish_reason(c.finish_reason, bool(calls))}


def _finish_reason(reason: str | None, has_calls: bool) -> str | None:
    return "tool_calls" if has_calls and reason == "stop" else reason


async def _chat_stream(run: ChatRun, rid, created, include_usage):
    gen, tok, plan = run.gen, run.tok, run.tools
    model = gen.model
    want_logprobs = gen.jobs[0].params.logprobs is not None
    extractors = {i: StreamingToolExtractor(plan.parser) for i in range(gen.n)} if plan.is_reading_calls else {}

    def chunk(index, delta, finish_reason=None, logprobs=None, stop_reason=None):
        c = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": index,
                    "delta": delta,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                    **({"stop_reason": stop_reason} if finish_reason else {}),
                }
            ],
        }
        if include_usage:
            c["usage"] = None
        return _sse(c)

    for i in range(gen.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    try:
        async for index, out in gen.deltas():
            logprobs = None
            if want_logprobs and out.logprobs:
                logprobs = {"content": _chat_logprobs(tok, list(zip(out.new_token_ids, out.logprobs, strict=True)))}
            text, calls = out.new_text, []
            if index in extractors:
                text, calls = extractors[index].feed(out.new_text, is_final=out.finished)
                calls = [d for d in calls if plan.is_parallel or d.index == 0]
            if text or logprobs:
                yield chunk(index, {"content": text}, logprobs=logprobs)
            if calls:
                yield chunk(index, {"tool_calls": [_call_delta(d) for d in calls]})
            if out.finished:
                has_calls = index in extractors and extractors[index].num_calls > 0
                reason = _finish_reason(out.finish_reason, has_calls)
                gen.meter.finished_as(index, reason)
                yield chunk(index, {}, finish_reason=reason, stop_reason=out.stop_reason)
    except APIError as e:  # after the 200: the error travels as an event
        gen.meter.failed(e)
        yield _sse(e.body())
        yield "data: [DONE]\n\n"
        return
    finally:
        gen.finish()
    if include_usage:
        yield _sse(
            {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": gen.usage.as_dict(),
            }
        )
    yield "data: [DONE]\n\n"


def _call_delta(d: ToolCallDelta) -> dict:
    """A streamed call's delta in OpenAI's form: index, id, type and name first, then arguments."""
    function = {"arguments": d.arguments} if d.name is None else {"name": d.name, "arguments": d.arguments}
    head = {"id": d.id, "type": "function"} if d.id is not None else {}
    return {"index": d.index, **head, "function": function}


def _chat_logprobs(tok, items) -> list[dict]:
    def entry(token_id, logprob):
        text = _token_text(tok, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [{**entry(t, lp.logprob), "top_logprobs": [entry(a, v) for a, v in lp.top]} for t, lp in items]


# -- models, tokenize, detokenize -----------------------------------------------------------------


async def list_models(request: Request) -> Response:
    """Every model with its state: loading, ready, unloaded (loads on demand), failed (and why)."""
    state = _state(request)
    data = []
    for endpoint in state.registry.endpoints.values():
        status = endpoint.status()
        info = endpoint.info
        entry = {
            "id": endpoint.name,
            "object": "model",
            "created": int(status.ready_since_s or state.started_s),
            "owned_by": "ladle",
            "root": endpoint.name,
            "aliases": list(endpoint.entry.aliases),
            "kind": endpoint.kind,
            "tasks": sorted(endpoint.tasks),
            "state": status.phase.value,
            "max_model_len": info.max_model_len if info else None,
        }
        if getattr(info, "dimensions", None) is not None:
            entry["dimensions"] = info.dimensions
        if status.failure:
            entry["error"] = status.failure
        data.append(entry)
    for router in state.router.routers.values():
        data.append({
            "id": router.name, "object": "model", "created": int(state.started_s), "owned_by": "ladle",
            "root": router.name, "state": "ready", "router": {"small": router.small, "large": router.large},
        })  # fmt: skip
    return JSONResponse({"object": "list", "data": data})


async def tokenize(request: Request) -> Response:
    body: TokenizeRequest = await parse_body(request, TokenizeRequest)
    check_allowed(_state(request), _state(request).principal(request), body.model)
    endpoint = (await _state(request).resolve(body.model)).endpoint
    tok = endpoint.tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt or messages", param="prompt")
    if body.messages is not None:
        plan = tool_plan(endpoint, body.tools, body.tool_choice, True)
        ids = chat_prompt(endpoint, body.messages, plan, body.add_generation_prompt, None)
    else:
        ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return JSONResponse({"count": len(ids), "max_model_len": endpoint.max_model_len, "tokens": ids})


async def detokenize(request: Request) -> Response:
    body: DetokenizeRequest = await parse_body(request, DetokenizeRequest)
    check_allowed(_state(request), _state(request).principal(request), body.model)
    endpoint = (await _state(request).resolve(body.model)).endpoint
    try:
        endpoint.tokenizer.validate_ids(body.tokens, param="tokens")
    except InvalidRequestError as e:
        raise from_ladle_error(e) from None
    return JSONResponse({"prompt": endpoint.tokenizer.decode(body.tokens, skip_special_tokens=False)})
