"""One usage row per HTTP request (docs/tenants.md): a Meter follows a request through its
handler and, once the response has been sent (or refused, or the client went away), hands one
UsageRecord to the server's sinks.

A metered handler (`@metered(api)`) receives its Meter first. The handler says which name the
request gave (`meter.requesting`, which also refuses a model the tenant may not use: 403), which
route admitted it (`meter.routed`) or which model answered (`meter.answered`), and the usage it
told the client (`meter.usage`: the Generation's own Usage, which its body or final chunk
carries). The Generation reports each sample's outputs (`meter.observe`): the first token's time,
and from each sample's final metrics its queue and engine time. The row is written exactly once,
in the `finally` of sending the response, with the status sent:

- 2xx: the route's outcome (served, degraded, fell_back) and the tokens of the `usage` sent
  (a stream without include_usage: the tokens the stream delivered);
- 499, the client went away first: aborted, with the tokens handed to the response so far;
- 4xx: rejected; 5xx: failed (or a stream that ended in an error event after its 200); both
  with zero tokens, since the client got an error, not a usage.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass

from ladle.engine.outputs import RequestOutput
from ladle.metering.tenants import DEFAULT_TENANT
from ladle.metering.usage import UsageRecord
from ladle.router.router import Route
from ladle.server.errors import APIError, ClientDisconnected

log = logging.getLogger(__name__)
CLIENT_GONE = 499  # the status a request is recorded with when its client went away first


@dataclass
class Usage:
    """The tokens of one HTTP request, as its response's `usage` tells them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }

    @classmethod
    def from_openai(cls, usage: dict) -> Usage:
        """An OpenAI `usage` object (an upstream's) as a Usage."""
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return cls(usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0, cached)


class Meter:
    """What one HTTP request used, gathered as it runs; finish() makes its UsageRecord."""

    def __init__(self, state, request, api: str):
        self.state = state
        self.arrival_s = time.time()
        self._start_s = time.monotonic()
        scope_state = request.scope.get("state", {})
        self.request_id: str = scope_state.get("request_id", "")
        self.principal = scope_state.get("principal")
        self.api = api
        self.requested: str | None = None  # the name the request gave
        self.model: str | None = None  # the model that answered
        self.outcome = "served"  # the route's: served, degraded, fell_back
        self.usage = Usage()  # what the client is told (a Generation's live Usage, once there is one)
        self.first_token_s: float | None = None  # monotonic
        self.queue_s: float | None = None
        self.engine_s = 0.0
        self.finish_reason: str | None = None
        self.error_status: int | None = None  # an error event sent inside a 200 stream
        self.row: UsageRecord | None = None  # once finished

    def requesting(self, name: str | None) -> None:
        """The model name the request gave (None: the default model); 403 if the tenant may not use it."""
        self.requested = name
        check_allowed(self.state, self.principal, name)

    def routed(self, route: Route) -> None:
        self.model, self.outcome = route.name, route.outcome

    def answered(self, name: str) -> None:
        self.model = name

    def observe(self, index: int, out: RequestOutput) -> None:
        """One sample's delta (index: its choice in the response)."""
        if self.first_token_s is None and out.new_token_ids:
            self.first_token_s = time.monotonic()
        if not out.finished:
            return
        if index == 0:
            self.finish_reason = out.finish_reason
        m = out.metrics
        if m is not None:
            self.engine_s += m.engine_time_s
            if index == 0 and m.first_scheduled_s is not None:
                self.queue_s = m.first_scheduled_s - m.arrival_s

    def finished_as(self, index: int, reason: str | None) -> None:
        """A sample's finish reason as the response tells it (a chat's tool_calls for stop)."""
        if index == 0:
            self.finish_reason = reason

    def failed(self, error: APIError) -> None:
        """An error the response carries after its 200 (an event in a stream)."""
        self.error_status = error.status

    def finish(self, status: int, crashed: bool = False) -> UsageRecord | None:
        """The request's row, given to every sink; only the first call counts."""
        if self.row is not None:
            return None
        now = time.monotonic()
        outcome = _outcome(status, self.outcome, crashed or self.error_status is not None)
        u = self.usage if status < 400 or status == CLIENT_GONE else Usage()
        if status == CLIENT_GONE and self.model is not None and self.finish_reason is None:
            self.finish_reason = "abort"  # its first sample was cut off
        p = self.principal
        self.row = UsageRecord(
            time_s=self.arrival_s,
            request_id=self.request_id,
            tenant=p.tenant.id if p is not None else DEFAULT_TENANT,
            key_id=p.key_id if p is not None else None,
            api=self.api,
            model_requested=self.requested,
            model=self.model,
            prompt_tokens=u.prompt_tokens,
            cached_tokens=u.cached_tokens,
            completion_tokens=u.completion_tokens,
            queue_s=self.queue_s,
            ttft_s=self.first_token_s - self._start_s if self.first_token_s is not None else None,
            duration_s=now - self._start_s,
            engine_s=self.engine_s,
            finish_reason=self.finish_reason,
            status=status,
            outcome=outcome,
            cost=self._cost(u),
        )
        try:
            self.state.record_usage(self.row)
        except Exception:  # a sink must not fail the request
            log.exception("recording the usage of request %s failed", self.request_id)
        return self.row

    def _cost(self, u: Usage) -> float:
        if self.model is None:
            return 0.0
        price = self.state.config.metering.price(self.model)
        uncached = u.prompt_tokens - u.cached_tokens
        return (
            uncached * price.prompt_per_1k / 1000
            + u.cached_tokens * price.cached_per_1k / 1000
            + u.completion_tokens * price.completion_per_1k / 1000
            + self.engine_s * price.per_engine_second
        )


def check_allowed(state, principal, name: str | None) -> None:
    """403 (model_not_allowed) unless the principal's tenant may use the model by this name (as
    the request gave it: a model, an alias or a router; None: the default model)."""
    tenant = principal.tenant if principal is not None else None
    checked = name if name is not None else state.registry.default_name
    if tenant is not None and not tenant.may_use(checked):
        allowed = ", ".join(f"`{m}`" for m in tenant.models)
        raise APIError(
            403,
            f"the tenant `{tenant.id}` may not use the model `{checked}`: it may use {allowed}",
            param="model",
            code="model_not_allowed",
        )


def _outcome(status: int, routed: str, is_failed: bool) -> str:
    if status == CLIENT_GONE:
        return "aborted"
    if status >= 500 or is_failed:
        return "failed"
    if status >= 400:
        return "rejected"
    return routed


def _status_of(error: BaseException) -> int:
    if isinstance(error, APIError):
        return error.status
    if isinstance(error, (ClientDisconnected, asyncio.CancelledError)):
        return CLIENT_GONE
    return 500


class _Metered:
    """A response that finishes its request's Meter once sent: with the status sent, or 499
    where the client went away before its last byte."""

    def __init__(self, response, meter: Meter):
        self.response = response
        self.meter = meter

    def __getattr__(self, name):  # status_code, headers, body: as the response's
        return getattr(self.response, name)

    async def __call__(self, scope, receive, send):
        status, is_complete, crashed = 0, False, False

        async def sending(message):
            nonlocal status, is_complete
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                is_complete = True

        try:
            await self.response(scope, receive, sending)
        except Exception:
            crashed = True
            raise
        finally:
            self.meter.finish((status or 500) if is_complete or crashed else CLIENT_GONE, crashed)


def metered(api: str):
    """A handler `f(request, meter)` whose request ends in one usage row (api: its route)."""

    def wrap(handler):
        @functools.wraps(handler)
        async def run(request):
            meter = Meter(request.app.state.ladle, request, api)
            try:
                response = await handler(request, meter)
            except BaseException as e:
                meter.finish(_status_of(e), crashed=not isinstance(e, (APIError, ClientDisconnected)))
                raise
            return _Metered(response, meter)

        return run

    return wrap
