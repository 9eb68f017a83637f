"""One usage row per HTTP request (docs/tenants.md), and who receives it.

The server builds a UsageRecord when a request ends, however it ends (served, degraded, fell
back, rejected, failed, aborted), and hands it to every UsageSink the server holds: the ledger
(written off the request path), the quota limiter (which settles what it reserved at admission),
the per-tenant Prometheus counters. A sink's record() never blocks and never raises into the
request: it queues or counts, and logs its own failures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

OUTCOMES = ("served", "degraded", "fell_back", "rejected", "failed", "aborted")


@dataclass(frozen=True)
class UsageRecord:
    time_s: float  # wall-clock (Unix) time the request arrived
    request_id: str  # the X-Request-Id the server answered with
    tenant: str  # the tenant's id ("default" where no tenants are configured)
    key_id: str | None  # the id of the API key it used (never the key); None: no key
    api: str  # the route: "/v1/chat/completions", "/v1/embeddings", "/v2/models/{name}/infer", ...
    model_requested: str | None  # the name the request gave (None: the default model)
    model: str | None  # the model that answered, after routing and degradation (None: none did)
    prompt_tokens: int  # as the client's `usage` says (all n samples share one prompt count)
    cached_tokens: int  # of prompt_tokens, served from the prefix cache
    completion_tokens: int  # as the client's `usage` says: all samples together
    queue_s: float | None  # arrival in the engine to first scheduled (None: never reached an engine)
    ttft_s: float | None  # arrival at the server to the first token (None: no token)
    duration_s: float  # arrival at the server to the end of the response
    engine_s: float  # its share of the engine's compute: each step's time split by the tokens it had in it
    finish_reason: str | None  # of the first sample: stop, length, tool_calls, abort, timeout (None: not generated)
    status: int  # HTTP status sent (499: the client went away first)
    outcome: str  # OUTCOMES
    cost: float = 0.0  # from the price table of the model that answered (MeteringConfig.prices)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@runtime_checkable
class UsageSink(Protocol):
    def record(self, row: UsageRecord) -> None:
        """Take one finished request's row; never blocks the request, never raises."""

    def close(self) -> None:
        """Flush what is queued and release what it holds (at server shutdown)."""
