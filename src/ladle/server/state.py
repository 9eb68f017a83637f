"""What the HTTP layer knows of the running server: the registry of models and the router, the
server's phase, its metrics. Handlers reach models only through the router."""

from __future__ import annotations

import contextlib
import enum
import logging
import time
from dataclasses import dataclass, field

from ladle.config import LadleConfig
from ladle.metering.ledger import Ledger
from ladle.metering.prometheus import ServerMetrics
from ladle.metering.store import Store
from ladle.metering.tenants import Principal, TenantDirectory
from ladle.metering.usage import UsageRecord, UsageSink
from ladle.router.complexity import Features
from ladle.router.endpoint import Endpoint
from ladle.router.registry import ModelNotFound, ModelUnavailable, Registry, WrongTask
from ladle.router.router import Overloaded, Pick, Route, Router
from ladle.server.errors import APIError

log = logging.getLogger(__name__)


class ServerPhase(enum.Enum):
    LOADING = "loading"  # the models declared for the start are loading
    READY = "ready"  # serving
    DRAINING = "draining"  # shutting down: in-flight requests finish, new ones get 503
    FAILED = "failed"  # no model could load; the process is exiting


@dataclass
class ServerState:
    config: LadleConfig
    metrics: ServerMetrics
    registry: Registry
    router: Router
    phase: ServerPhase = ServerPhase.LOADING
    failure: str | None = None  # why the server could not start
    started_s: float = field(default_factory=time.time)
    exit_code: int = 0
    directory: TenantDirectory = field(default_factory=TenantDirectory)  # tenants and their keys
    sinks: list[UsageSink] = field(default_factory=list)  # each request's usage row goes to all of them
    store: Store | None = None  # where tenants, keys and usage persist (None: nowhere, as in unit tests)
    ledger: Ledger | None = None  # the sink writing usage rows to the store (None: --no-ledger)

    def record_usage(self, row: UsageRecord) -> None:
        for sink in self.sinks:
            sink.record(row)

    def close_sinks(self) -> None:
        """At shutdown, after the drain: every sink writes what it holds, then the store closes."""
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:  # one sink's failure must not keep the others (or the store) open
                log.exception("closing the usage sink %s failed", type(sink).__name__)
        if self.store is not None:
            self.store.close()

    @staticmethod
    def principal(request) -> Principal:
        """Who sent the request (set by the middleware once its key passed)."""
        return request.scope["state"]["principal"]

    def check_serving(self) -> None:
        """503 while the server drains (requests for a model still loading wait for it)."""
        if self.phase == ServerPhase.DRAINING:
            raise APIError(
                503,
                "the server is shutting down and takes no new requests",
                code="draining",
                headers={"Retry-After": "5", "Connection": "close"},
            )
        if self.phase == ServerPhase.FAILED:
            raise APIError(503, f"the server failed to start: {self.failure}", code="model_load_failed")

    async def resolve(self, requested: str | None, features: Features | None = None) -> Pick:
        """The ready generating model a name reaches; the registry's refusals as the API's errors."""
        self.check_serving()
        with self._refusals():
            return await self.router.resolve(requested, features)

    async def acquire(self, requested: str, task: str) -> Endpoint:
        """The ready non-generative model (embeddings, tensors) a name reaches, for `task`."""
        self.check_serving()
        with self._refusals():
            return await self.router.registry.acquire(requested, task)

    @contextlib.contextmanager
    def _refusals(self):
        try:
            yield
        except ModelNotFound as e:
            raise APIError(404, str(e), param="model", code="model_not_found") from None
        except WrongTask as e:
            raise APIError(400, str(e), param="model", code="model_not_supported") from None
        except ModelUnavailable as e:
            self.metrics.observe_outcome(e.name, "failed")
            headers = {"Retry-After": str(e.retry_after_s)} if e.retry_after_s else None
            raise APIError(503, str(e), code=e.code, headers=headers) from None

    def admit(self, pick: Pick, prompt_tokens: int) -> Route:
        """The router's admission; a refusal is a 429 with Retry-After. Every outcome is counted."""
        try:
            route = self.router.admit(pick, prompt_tokens)
        except Overloaded as e:
            self.metrics.observe_outcome(e.name, "rejected")
            raise APIError(
                429, str(e), code="rate_limit_exceeded", headers={"Retry-After": str(e.retry_after_s)}
            ) from None
        self.metrics.observe_outcome(route.name, route.outcome)
        return route
